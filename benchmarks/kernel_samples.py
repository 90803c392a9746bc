"""How many sampled completions the language-model kernel needs: sampled vs exact softmax Gauss–Newton.

The kernel of a causal language model (``lightning_sketch.attribution.task``, ``language_model``) is
the softmax Gauss–Newton matrix G = Σ_examples Σ_positions J_pᵀ(diag p − ppᵀ)J_p, estimated from S
completions drawn from the model per example: K_S = (1/S) Σ_s Σ_t ĝ_{t,s} ĝ_{t,s}ᵀ with ĝ the loss
gradient at the drawn tokens (E K_S = G). This script measures, on a small trained causal LM whose
exact G fits in memory (parameters N ≈ 1.3k), through a sketch of dimension D (AFFD, the default):

- the relative Frobenius error ‖ΦK_SΦᵀ − ΦGΦᵀ‖ / ‖ΦGΦᵀ‖ for S = 1, 2, 4, 8, 16 (mean of 3 seeds);
- the error that matters for TRAK: the relative error of the damped inverse applied to the stored
  rows, ‖(K_S + λI)⁻¹Gᵀ − (G + λI)⁻¹Gᵀ‖ / ‖(G + λI)⁻¹Gᵀ‖ with λ = tr(G)/T (ratio 1);
- the empirical Fisher (true labels, what the library used before) on the same scale, for comparison.

Run: ``python benchmarks/kernel_samples.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sketch.attribution.task import resolve_task
from lightning_sketch.gradients import ParamLayout, sketch_gradients
from lightning_sketch.sketches import make

V, L, T, D = 12, 10, 96, 256


class BigramLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.hid = nn.Linear(32, 24)
        self.out = nn.Linear(24, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)
        prev = F.pad(e, (0, 0, 1, 0))[:, :-1]  # the token before (zeros at the start): causal
        return self.out(torch.tanh(self.hid(torch.cat([e, prev], -1))))

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        logits, labels = self(batch["input_ids"])[:, :-1], batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="none")
        return ce.view(labels.shape).sum(1)


def data(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(3 * torch.randn(V, V, generator=g), -1)  # a sparse-ish Markov chain
    ids = torch.zeros(T, L, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (T,), generator=g)
    for j in range(1, L):
        ids[:, j] = torch.multinomial(trans[ids[:, j - 1]], 1, generator=g)[:, 0]
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels, "index": torch.arange(T)}


def main() -> None:
    torch.manual_seed(0)
    model, batch = BigramLM(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):  # train to a partly fitted model (the regime where the kernels differ)
        opt.zero_grad()
        model.per_example_loss(batch).mean().backward()
        opt.step()
    model.eval()
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, D, seed=0)
    task = resolve_task(model, batch, kernel_samples=1)
    assert task.kind == "language_model", task.reason

    def kernel(fn, b) -> torch.Tensor:
        rows = sketch_gradients(model, fn, b, sketch, layout=layout).double()
        return rows.T @ rows

    # exact G through the sketch: ΦJ_pᵀ (diag p − ppᵀ) J_pΦᵀ = Σ_v w_v (Φ∇log p_v)(...)ᵀ form, computed as
    # Σ_classes p_c (Φ∇ℓ_c)(Φ∇ℓ_c)ᵀ − (Σ_c p_c Φ∇ℓ_c)(...)ᵀ per position: one labelled pass per vocabulary
    # token and position (V·(L−1) passes over the T examples).
    t0 = time.perf_counter()
    with torch.no_grad():
        p = torch.softmax(model(batch["input_ids"])[:, :-1].double(), -1)  # [T, L-1, V]
    exact = torch.zeros(D, D, dtype=torch.float64)
    for pos in range(1, L):
        if bool((batch["labels"][:, pos] == -100).all()):
            continue
        grads = []
        for c in range(V):
            lab = torch.full_like(batch["labels"], -100)
            lab[:, pos] = c
            b = {**batch, "labels": lab}
            grads.append(sketch_gradients(model, model.__class__.per_example_loss, b, sketch,
                                          layout=layout).double())  # [T, D]: Φ∇(−log p_c) at pos
        Gc = torch.stack(grads, 1)  # [T, V, D]
        w = p[:, pos - 1]  # [T, V]
        mean = torch.einsum("tv,tvd->td", w, Gc)
        exact += torch.einsum("tv,tvd,tve->de", w, Gc, Gc) - mean.T @ mean
    t_exact = time.perf_counter() - t0
    G = sketch_gradients(model, model.__class__.per_example_loss, batch, sketch, layout=layout).double()
    lam = float(exact.trace()) / T
    eye = torch.eye(D, dtype=torch.float64)
    ref = torch.linalg.solve(exact + lam * eye, G.T)

    def errors(K: torch.Tensor) -> tuple[float, float]:
        frob = float((K - exact).norm() / exact.norm())
        inv = float((torch.linalg.solve(K + lam * eye, G.T) - ref).norm() / ref.norm())
        return frob, inv

    out = {"N": layout.dim, "D": D, "T": T, "exact_seconds": t_exact, "samples": {}}
    out["empirical"] = dict(zip(("frob", "inverse"), errors(G.T @ G)))
    for S in (1, 2, 4, 8, 16):
        frob, inv, secs = [], [], []
        for seed in range(3):
            t0 = time.perf_counter()
            K = torch.zeros(D, D, dtype=torch.float64)
            for fn, b, w in resolve_task(model, batch, kernel_samples=S).kernel_terms(
                    model, batch, torch.Generator().manual_seed(seed)):
                K += w * kernel(fn, b)
            secs.append(time.perf_counter() - t0)
            f, i = errors(K)
            frob.append(f)
            inv.append(i)
        out["samples"][S] = {"frob": sum(frob) / 3, "inverse": sum(inv) / 3, "seconds": sum(secs) / 3}
    json.dump(out, sys.stdout, indent=1)
    print()
    print(f"| kernel | rel. Frobenius error | rel. error of (K+λI)⁻¹Gᵀ | seconds |")
    print("|---|---|---|---|")
    print(f"| empirical Fisher | {out['empirical']['frob']:.3f} | {out['empirical']['inverse']:.3f} | – |")
    for S, r in out["samples"].items():
        print(f"| sampled, S = {S} | {r['frob']:.3f} | {r['inverse']:.3f} | {r['seconds']:.2f} |")
    print(f"| exact (V·L passes) | 0 | 0 | {t_exact:.2f} |")


if __name__ == "__main__":
    main()
