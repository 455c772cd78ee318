"""A small deterministic PyTorch training loop that uses the checkpoint SDK.

Synthetic MNIST-shaped data (784 inputs, 10 classes) drawn from torch's global RNG, an
MLP with dropout, Adam. Everything random comes from the registered RNG states, so a run
that is checkpointed, killed and restored, or migrated, continues bit-identically.

    python -m tools.examples.train_mnist_like --steps 200 --seed 0
    GPUMESH_CHECKPOINT_SOCKET=/tmp/w.sock python -m tools.examples.train_mnist_like ...
    GPUMESH_RESTORE_FROM=/path/to/checkpoint python -m tools.examples.train_mnist_like ...
    python -m tools.examples.train_mnist_like --device cuda     # on a GPU (deterministic kernels)

Prints one JSON line per `--print-every` steps ({"step", "loss", "checksum"}) and a last
line {"done": true, "step", "checksum", "started_at"}; `--final-dir DIR` saves the final
state there (the checkpoint format), `--save-every N --save-dir DIR` checkpoints as it goes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch

import mesh.checkpoint as mc


def build(seed: int, hidden: int, device: str = "cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(hidden, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt


def param_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--sleep-ms", type=float, default=0.0, help="pause per step (stands in for a slower model)")
    ap.add_argument("--print-every", type=int, default=10)
    ap.add_argument("--final-dir", help="save the final state here")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--save-dir")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (default: cpu)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # same arithmetic in every process
    if args.device.startswith("cuda"):
        # bit-identical continuation needs deterministic kernels (cuBLAS wants a fixed workspace)
        import os
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.cuda.init()  # before register_rng, so the CUDA generators' states are kept too
    model, opt = build(args.seed, args.hidden, args.device)
    ckpt = mc.connect(workload_id="train-mnist-like")
    ckpt.register_module("model", model)
    ckpt.register_optimizer("adam", opt)
    ckpt.register_rng()
    ckpt.extras["seed"] = args.seed
    ckpt.restore_if_requested()
    started_at = ckpt.step
    print(json.dumps({"started_at": started_at, "checksum": param_checksum(model)}), flush=True)

    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(ckpt.step, args.steps):
        x = torch.randn(args.batch, 784).to(args.device)
        y = torch.randint(0, 10, (args.batch,)).to(args.device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if args.sleep_ms:
            time.sleep(args.sleep_ms / 1e3)
        if args.save_every and args.save_dir and (step + 1) % args.save_every == 0:
            ckpt.step = step + 1
            ckpt.save(args.save_dir)
        if (step + 1) % args.print_every == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 6), "checksum": param_checksum(model)}),
                  flush=True)
        ckpt.safe_point(step + 1)
    if args.final_dir:
        ckpt.save(args.final_dir)
    print(json.dumps({"done": True, "step": ckpt.step, "started_at": started_at,
                      "checksum": param_checksum(model)}), flush=True)
    ckpt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
