//! A small builder for Prometheus metric families from plain values, shared by Watt's own
//! metrics and the dcgm-exporter compatible ones.

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

/// Label pairs built once per GPU and cloned per sample.
pub type Labels = Vec<LabelPair>;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_string());
            pair.set_value((*value).to_string());
            pair
        })
        .collect()
}

/// Whether a family is a gauge or a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// One family being filled in.
#[derive(Debug)]
pub struct Family {
    family: MetricFamily,
    kind: Kind,
}

impl Family {
    pub fn new(name: &str, help: &str, kind: Kind) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(match kind {
            Kind::Gauge => MetricType::GAUGE,
            Kind::Counter => MetricType::COUNTER,
        });
        Family { family, kind }
    }

    /// Add one series. `extra` labels come after the shared ones.
    pub fn push(&mut self, base: &Labels, extra: &[(&str, &str)], value: f64) {
        let mut label = base.clone();
        if !extra.is_empty() {
            label.extend(labels(extra));
        }
        let mut metric = Metric::from_label(label);
        match self.kind {
            Kind::Gauge => {
                let mut g = Gauge::default();
                g.set_value(value);
                metric.set_gauge(g);
            }
            Kind::Counter => {
                let mut c = Counter::default();
                c.set_value(value);
                metric.set_counter(c);
            }
        }
        self.family.mut_metric().push(metric);
    }

    /// The family, or `None` if it has no series (the text format has no empty families).
    pub fn finish(self) -> Option<MetricFamily> {
        (!self.family.get_metric().is_empty()).then_some(self.family)
    }
}
