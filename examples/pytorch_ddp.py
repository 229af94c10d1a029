"""A PyTorch DistributedDataParallel training script under Watt's worker contract.

Watt's agent starts it like torchrun would: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT and CUDA_VISIBLE_DEVICES are set, so `init_process_group` needs no arguments. NCCL on
GPUs, gloo on CPU. It checkpoints to WATT_CHECKPOINT_DIR every --checkpoint-every steps and on
SIGTERM (Watt's stop: SIGTERM, a grace period, then SIGKILL), resumes from the newest checkpoint
at any world size (the global batch is fixed and split across ranks), and reports progress with
watt_progress.report. The rendezvous is torch.distributed's own TCPStore at MASTER_ADDR:MASTER_PORT,
unchanged: it does not check WATT_RUN_TOKEN (Watt's secret guards watt-worker's ring), so run such
jobs on a network only the cluster's nodes reach. A job spec:

    name: ddp-demo
    shards: {min: 1, max: 1}
    gpus_per_shard: 1
    command: [python3, /opt/watt/examples/pytorch_ddp.py, --steps, "2000"]
"""
import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from watt_progress import report  # noqa: E402

stop = False


def on_sigterm(signum, frame):
    global stop
    stop = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--bf16", action="store_true", help="autocast the forward pass to bfloat16 (GPUs only)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.width, args.width), nn.GELU(), nn.Linear(args.width, 1)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)

    ckpt_dir = os.environ.get("WATT_CHECKPOINT_DIR")
    step = 0
    if ckpt_dir and os.path.exists(os.path.join(ckpt_dir, "latest.pt")):
        state = torch.load(os.path.join(ckpt_dir, "latest.pt"), map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]

    def save():
        if rank == 0 and ckpt_dir:
            os.makedirs(ckpt_dir, exist_ok=True)
            tmp = os.path.join(ckpt_dir, "latest.pt.tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(ckpt_dir, "latest.pt"))

    local = args.global_batch // world + (1 if rank < args.global_batch % world else 0)
    started = time.time()
    while step < args.steps:
        # The batch is made where it is used: a host-made batch would keep a GPU waiting on the CPU.
        g = torch.Generator(device=device).manual_seed(step * world + rank)
        x = torch.randn(local, args.width, generator=g, device=device)
        y = x[:, :1].sin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and cuda):
            loss = nn.functional.mse_loss(ddp(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        # Every rank votes: whoever got SIGTERM, all stop after this same step.
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        dist.all_reduce(flag)
        report(step=step, samples=step * args.global_batch, loss=loss.item(), world_size=world)
        if step % args.checkpoint_every == 0 or step == args.steps or flag.item() > 0:
            save()
        if flag.item() > 0:
            dist.destroy_process_group()
            sys.exit(143)
    if rank == 0:
        print(f"done: {step} steps in {time.time() - started:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
