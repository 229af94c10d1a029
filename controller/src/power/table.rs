//! Stored power sources and site settings.
