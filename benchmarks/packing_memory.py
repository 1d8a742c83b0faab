"""Training memory of padded and packed micro-batches on mixed-length data, through qalign's own step functions.

    PYTHONPATH=. python benchmarks/packing_memory.py [--stage sft] [--steps 20] [--no-checkpointing]

Each layout runs in a process of its own (the resident set is per process): the small benchmark model, 4-bit,
LoRA, an AdamW step per micro-batch of 4 examples, the same examples in both layouts (bench_setup's mixed
lengths). Printed per step: the row's tokens and the resident memory above what was in use before the second
step (VmRSS and its high-water mark, reset through /proc/self/clear_refs), then the forward's bytes saved for
backward (torch.autograd.graph.saved_tensors_hooks, each storage once; without checkpointing this is the
activations the backward holds). Memory a step leaves resident that its tensors no longer use (kernel caches,
freed heap) shows as a rise that stays; `--cache-capacity 0` sets ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 for both
layouts, to tell oneDNN's matmul primitive cache apart. CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise ValueError(field)


def run_layout(args: argparse.Namespace) -> dict:
    import torch
    from bench_setup import build_model
    from packing_speed import dpo_examples, sft_examples

    from qalign.dpo import collate_dpo, collate_dpo_packed, sequence_logprobs
    from qalign.lora import tune_lora_layers
    from qalign.model import attach_lora, compute_dtype, load_base
    from qalign.recipe import LoraSpec, ModelSpec
    from qalign.sft import collate_sft, collate_sft_packed, sft_step

    folder = Path(args.model_dir)
    if not (folder / "config.json").exists():
        build_model(args.model, folder)
    device = torch.device("cpu")
    dtype = compute_dtype("auto", device)
    torch.manual_seed(0)
    lora = LoraSpec(r=16, alpha=32, dropout=0.05 if args.stage == "sft" else 0.0)
    model = attach_lora(load_base(ModelSpec(base=str(folder), quantization="nf4"), device), lora, args.ckpt)
    tune_lora_layers(model, dtype)
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    n = args.steps * args.batch_size
    examples = (sft_examples if args.stage == "sft" else dpo_examples)(random.Random(0), n, vocab)
    batches = [examples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    if args.stage == "sft":
        collate = (lambda b: collate_sft(b, 0)) if args.layout == "padded" else collate_sft_packed
        loss_of = lambda batch: sft_step(model, batch, 100)[0]  # noqa: E731
    else:
        collate = (
            (lambda b: collate_dpo(b, 0)) if args.layout == "padded" else (lambda b: collate_dpo_packed(b, 0))
        )
        loss_of = lambda batch: -sequence_logprobs(model, batch)[0].sum() / 100  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    steps, base = [], 0.0
    for index, examples in enumerate(batches):
        batch = collate(examples)
        if index == 1:  # after the first step: the optimizer's state and the gradients exist
            Path("/proc/self/clear_refs").write_text("5")
            base = status_mib("VmRSS")
        saved: dict[int, int] = {}

        def keep(tensor: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with (
            torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
            torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32),
        ):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(
            {
                "tokens": batch["input_ids"].numel(),
                "saved_mib": sum(saved.values()) / 2**20,
                "rss_mib": status_mib("VmRSS") - base,
                "hwm_mib": status_mib("VmHWM") - base,
            }
        )
    return {"layout": args.layout, "steps": steps[1:], "train_mib": status_mib("VmHWM") - base}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpointing", dest="ckpt", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache-capacity", type=int, default=None, help="ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    parser.add_argument("--layout", choices=["padded", "packed"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout is not None:
        print(json.dumps(run_layout(args)))
        return
    env = dict(os.environ)
    if args.cache_capacity is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.cache_capacity)
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for layout in ("padded", "packed"):
            command = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--layout",
                layout,
                "--model-dir",
                f"{tmp}/model",
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            results[layout] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{args.stage}, model {args.model}, checkpointing {'on' if args.ckpt else 'off'}, "
        f"{args.steps} micro-batches of {args.batch_size}; MiB above the memory before step 2"
    )
    print("step | padded tokens  saved   rss   peak | packed tokens  saved   rss   peak")
    for i, (a, b) in enumerate(zip(results["padded"]["steps"], results["packed"]["steps"], strict=True)):
        cells = [
            f"{s['tokens']:13} {s['saved_mib']:6.1f} {s['rss_mib']:5.0f} {s['hwm_mib']:6.0f}" for s in (a, b)
        ]
        print(f"{i + 2:4} | " + " | ".join(cells))
    print(
        f"training memory (peak RSS above the start of step 2): padded {results['padded']['train_mib']:.0f} MiB, "
        f"packed {results['packed']['train_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
