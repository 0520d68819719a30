"""One rank of a pipelined training step, checked against the unsplit model (run by tests/test_pipeline.py).

    torchrun --nproc_per_node=2 tests/pipeline_worker.py FAMILY SCHEDULE MICROBATCHES OUT

Every rank builds the same model (seeded, float64, eval mode: no dropout, BatchNorm on its
running statistics, so micro-batches compute what the whole batch does), computes the
unsplit loss and gradients itself, then runs its stage of ``surgery.pipeline`` under the
schedule, sums the tied parameters' gradients, takes one SGD step on both, and writes
``OUT/rank{r}.json`` with the largest differences.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

import surgery

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
BATCH, LENGTH, VOCAB = 8, 12, 64


def build(family: str) -> tuple[torch.nn.Module, dict, torch.Tensor, list[str] | None]:
    torch.manual_seed(0)
    if family == "resnet":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        with torch.no_grad():  # running statistics that are not the identity
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
        return model, {"x": x}, torch.randint(0, 10, (BATCH,)), ["layer1", "layer2", "layer3", "layer4"]
    import transformers

    transformers.logging.set_verbosity_error()
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=64,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))
    inputs = {"input_ids": ids}
    if family == "llama":  # padding at the end of some rows: the mask crosses the cut
        mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
        mask[::2, -3:] = 0
        inputs["attention_mask"] = mask
    return model, inputs, torch.randint(0, VOCAB, (BATCH, LENGTH)), None


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def logits(out) -> torch.Tensor:  # noqa: ANN001
    return out if isinstance(out, torch.Tensor) else out.logits


def main() -> None:
    family, schedule, microbatches, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, inputs, target, layers = build(family)
    model = model.double().eval()
    reference = copy.deepcopy(model)
    ref_loss = loss_fn(logits(reference(**inputs)), target)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    example = {k: v[:2] for k, v in inputs.items()}
    plan = surgery.pipeline(model, world, example, balance="flops", layers=layers)
    stage = plan.stage(rank, "cpu")
    tied = plan.tied(rank)
    run = SCHEDULES[schedule](stage, n_microbatches=microbatches, loss_fn=loss_fn)
    losses: list[torch.Tensor] = []
    if rank == 0:
        run.step(**inputs)
    elif rank == world - 1:
        run.step(target=target, losses=losses)
    else:
        run.step()
    tied()
    named = dict(plan.stages[rank].named_parameters())
    by_tensor = {id(p): n for n, p in model.named_parameters()}  # the piece's parameters are the model's own
    grad_diff = max(
        float((p.grad - ref_grads[by_tensor[id(p)]]).abs().max()) for p in named.values() if p.grad is not None
    )
    missing = [n for n, p in named.items() if p.grad is None]
    torch.optim.SGD([p for p in named.values()], lr=0.1).step()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    ref_params = dict(reference.named_parameters())
    step_diff = max(float((p - ref_params[by_tensor[id(p)]]).abs().max()) for p in named.values())
    record = {
        "rank": rank,
        "cuts": plan.cuts,
        "shares": plan.shares,
        "grad_diff": grad_diff,
        "step_diff": step_diff,
        "missing_grads": missing,
        "params": len(named),
        "tied": [name for name, _ in plan.tied_parameters()],
    }
    if losses:
        record["loss_diff"] = abs(float(torch.stack(losses).mean()) - float(ref_loss))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
