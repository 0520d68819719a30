"""Train a small GPT-2 as pipeline stages cut from its pieces, one stage per process.

    torchrun --nproc_per_node=2 examples/pipeline_gpt2.py                  # 1F1B, 4 micro-batches, 60 steps
    torchrun --nproc_per_node=2 examples/pipeline_gpt2.py --steps 3        # a smoke run
    torchrun --nproc_per_node=4 examples/pipeline_gpt2.py --schedule gpipe --microbatches 8

The text is the bytes of the Python standard library's sources (``sysconfig.get_paths()["stdlib"]``,
read here, nothing copied), a byte per token. ``surgery.pipeline`` cuts the GPT-2 (tied embeddings:
``wte`` is also ``lm_head``) at its layers into as many stages as there are processes, balanced by
FLOPs; each rank trains its stage under torch's 1F1B (or GPipe) schedule with AdamW. The embedding
lives on the first and the last stage: ``plan.tied(rank)`` sums its two gradients after every step,
so both copies take the same update and stay tied. On CPU the ranks talk over gloo; with CUDA each
rank runs on ``cuda:LOCAL_RANK`` over nccl. Rank 0 prints the stages' shares, the last rank the loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

import surgery

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
CONFIG = dict(n_layer=6, n_embd=128, n_head=4, vocab_size=256, n_positions=128, tie_word_embeddings=True)
CONFIG.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (a multiple of --microbatches)")
    parser.add_argument("--block", type=int, default=128, help="tokens per sequence (at most 128)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run it under torchrun: torchrun --nproc_per_node=2 examples/pipeline_gpt2.py")
    if args.steps < 1 or args.microbatches < 1 or args.batch % args.microbatches:
        parser.error(f"--batch {args.batch} must be a positive multiple of --microbatches {args.microbatches}")
    if not 1 <= args.block <= CONFIG["n_positions"]:
        parser.error(f"--block must be between 1 and {CONFIG['n_positions']}")
    return args


def stdlib_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's .py files (sorted paths), as tokens."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= limit:
            break
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    if world > CONFIG["n_layer"]:
        sys.exit(f"{world} processes for {CONFIG['n_layer']} layers: run at most {CONFIG['n_layer']} processes")

    torch.manual_seed(0)  # every rank builds the same model, then keeps its stage
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    example = {"input_ids": torch.randint(0, 256, (args.batch // args.microbatches, args.block))}
    plan = surgery.pipeline(model, world, example, balance="flops")
    stage, tied = plan.stage(rank, device), plan.tied(rank)
    if rank == 0:
        shares = ", ".join(f"{s:.1%}" for s in plan.shares)
        print(f"{world} stages cut after {plan.cuts}; FLOPs shares {shares} (imbalance {plan.imbalance:.1%})")

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    schedule = SCHEDULES[args.schedule](stage, n_microbatches=args.microbatches, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(stage.submod.parameters(), lr=args.lr)
    data = stdlib_bytes()
    batches = torch.Generator().manual_seed(1)  # the same batches on every rank: the first feeds, the last scores
    began = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - args.block - 1, (args.batch,), generator=batches)
        x = torch.stack([data[s : s + args.block] for s in starts]).to(device)
        y = torch.stack([data[s + 1 : s + 1 + args.block] for s in starts]).to(device)
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(input_ids=x, target=y if world == 1 else None, losses=losses)
        elif rank == world - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        tied()  # the embedding's gradients from the first and the last stage, summed on both
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == world - 1 and (step % args.log_every == 0 or step in (1, args.steps)):
            tokens = step * args.batch * args.block / (time.perf_counter() - began)
            print(f"step {step:4d}  loss {torch.stack(losses).mean().item():.4f}  {tokens:,.0f} tokens/s", flush=True)
    for param, group in tied.reductions:  # the copies of a tied parameter took the same updates: still equal
        low, high = param.detach().clone(), param.detach().clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        if rank == world - 1:
            print(f"tied copies across stages differ by at most {float((high - low).abs().max()):.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
