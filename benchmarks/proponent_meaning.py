"""What a proponent means on the main job: label agreement and hubs of the default and its second view.

Runs ``lightning-sketch query`` (in process) on every test image of a digits run for the default method
(``trak``, with its default second view ``grad_cos``) and for ``tracin``, then prints each ranking's
per-run statistics as the CLI computes them (``proponent_summary``), and how far ``grad_cos`` on the
margin sketches of ``trak`` is from ``grad_cos`` on the loss gradients (why the view does not reuse them).

Usage (after ``lightning-sketch fit --config configs/digits.yaml --trainer.default_root_dir RUN``)::

    python benchmarks/proponent_meaning.py --run RUN [--k 10] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/digits")
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200, help="the first test images (the split holds 200)")
    args = ap.parse_args()
    from lightning_sketch import cli
    from lightning_sketch.attribution import Attributor
    from lightning_sketch.cli.commands import load_checkpoint_into

    run = Path(args.run)
    ids = ",".join(str(i) for i in range(args.queries))
    base = ["query", "--store", str(run / "sketch"), "--ckpt", str(run / "checkpoints" / "last.ckpt"),
            "--config", args.config, "--ids", ids, "--k", str(args.k), "--format", "json"]
    docs = {}
    for name, extra in (("trak", []), ("tracin", ["--method", "tracin"])):
        out = run / f"proponents_{name}.json"
        t0 = time.perf_counter()
        assert cli.main([*base, *extra, "--output", str(out)]) == 0
        docs[name] = json.loads(out.read_text())
        print(f"query --method {name}: {time.perf_counter() - t0:.1f} s")
    rankings = [("trak", docs["trak"]), ("grad_cos (view of trak)", docs["trak"]["second_view"]),
                ("tracin", docs["tracin"])]
    for name, doc in rankings:
        s = doc["summary"]
        hubs = ", ".join(f"{h['id']}×{h['queries']}" for h in s["hubs"])
        print(f"{name:<24} label agreement {s['label_agreement']:.3f} (all {s['label_agreement_queries']}), "
              f"{s['label_agreement_correct']:.3f} (correct {s['correct_queries']}); distinct "
              f"{s['distinct']}/{s['pairs']}; hubs {hubs}")
    # the grad_cos view (margin sketches) against grad_cos on the loss gradients
    model, dm = cli.build_from_config([args.config])
    load_checkpoint_into(model, run / "checkpoints" / "last.ckpt")
    model.eval()
    dm.setup("test")
    from torch.utils.data import default_collate

    ds = dm.test_dataloader().dataset
    batch = default_collate([ds[i] for i in range(args.queries)])
    from lightning_sketch.attribution import negative_margin_of

    loss_cos = Attributor(run / "sketch", model, method="grad_cos").scores(batch)  # [Q, T]
    margin_cos = Attributor(run / "sketch", model, method="grad_cos",
                            query_loss_fn=negative_margin_of(model)).scores(batch)
    view = docs["trak"]["second_view"]["queries"]
    k = args.k
    top_m, top_l = margin_cos.topk(k, dim=1).indices, loss_cos.topk(k, dim=1).indices
    ids_t = Attributor(run / "sketch", model, method="grad_cos").ids
    same_view = all([e["id"] for e in rec["proponents"]] == ids_t[top_l[q]].tolist()
                    for q, rec in enumerate(view))
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_m, top_l)) / (k * len(view))
    rel = float(((margin_cos - loss_cos).abs().amax(1) / loss_cos.abs().amax(1)).max())
    print(f"the CLI's grad_cos view == grad_cos on loss gradients: {same_view}; grad_cos on margin gradients "
          f"against it: mean top-{k} overlap {overlap:.3f}, max relative score difference {rel:.2e}")

if __name__ == "__main__":
    main()
