"""The three callbacks follow Lightning's own conventions (issue 13, part 5).

One argument name for the sketch kind, option groups that LightningCLI reads from YAML, warnings on
rank zero only, a warning when ``every_n_epochs`` has no effect, and every attribute declared in
``__init__``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from attribution.attr_helpers import TinyClassifier, blobs, loader
from lightning.pytorch import Trainer

from lightning_sketch.callbacks import (
    GradientSketch,
    HessianSpectrum,
    IntrinsicDimension,
    SearchCriteria,
    SpectrumNumerics,
)
from lightning_sketch.exceptions import SketchConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_shipped_configs_use_the_current_argument_names():
    import dataclasses
    import inspect

    import yaml

    for cls in (GradientSketch, HessianSpectrum, IntrinsicDimension):
        assert "sketch_kind" in inspect.signature(cls.__init__).parameters, cls.__name__
    numerics = {f.name for f in dataclasses.fields(SpectrumNumerics)}
    criteria = {f.name for f in dataclasses.fields(SearchCriteria)}
    for cfg in sorted(CONFIGS.glob("*.yaml")):
        for cb in (yaml.safe_load(cfg.read_text()).get("trainer") or {}).get("callbacks") or []:
            args = set(cb.get("init_args") or {})
            assert "kind" not in args, cfg.name  # the deprecated alias of sketch_kind
            if cb["class_path"].endswith("HessianSpectrum"):
                assert not args & numerics, (cfg.name, args & numerics)  # they belong under `numerics:`
            if cb["class_path"].endswith("IntrinsicDimension"):
                assert not args & criteria, (cfg.name, args & criteria)  # they belong under `criteria:`


# ---------------------------------------------------------------------------- every_n_epochs
def test_a_cadence_in_inline_mode_is_refused():
    with pytest.raises(SketchConfigError, match=r"every_n_epochs=2\) has no effect in inline mode.*mode='checkpoint'"):
        GradientSketch(dirpath="d", mode="inline", every_n_epochs=2)
    with pytest.raises(SketchConfigError, match=r"every_n_steps=3\) has no effect in inline mode"):
        GradientSketch(dirpath="d", mode="inline", every_n_steps=3)


def test_both_cadences_are_refused():
    with pytest.raises(SketchConfigError, match=r"every_n_epochs=1, every_n_steps=5\): set only one"):
        GradientSketch(dirpath="d", every_n_epochs=1, every_n_steps=5)


def test_every_n_epochs_defaults_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GradientSketch(dirpath="d").every_n_epochs == 1
        assert GradientSketch(dirpath="d", every_n_steps=5).every_n_epochs is None
        assert GradientSketch(dirpath="d", mode="inline").every_n_epochs is None


# ---------------------------------------------------------------------------- option groups
def test_numerics_is_the_only_way_to_pass_numerical_settings():
    with pytest.raises(TypeError, match="unexpected keyword"):
        HessianSpectrum(num_iter=12)  # type: ignore[call-arg]
    with pytest.raises(SketchConfigError, match="must be a SpectrumNumerics"):
        HessianSpectrum(numerics={"num_iter": 12})  # type: ignore[arg-type]
    assert HessianSpectrum(numerics=SpectrumNumerics(num_iter=12)).numerics.num_iter == 12
    with pytest.raises(SketchConfigError, match="`trace_matvecs` must be an int >= 6"):
        SpectrumNumerics(trace_matvecs=3)


def _parse(tmp_path, text: str) -> list:
    from lightning_sketch.cli import _cli_class, _import_callbacks, _parsing_settings, expand_base_configs

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"base_config: {CONFIGS / 'base.yaml'}\n{text}")
    _import_callbacks()
    _parsing_settings()
    args = expand_base_configs(["--config", str(cfg), f"--trainer.default_root_dir={tmp_path}"])
    cli = _cli_class()(args=args, run=False, save_config_callback=None)
    return cli.trainer.callbacks


def test_lightning_cli_reads_the_option_group(tmp_path):
    text = """trainer:
  callbacks:
    - class_path: lightning_sketch.callbacks.HessianSpectrum
      init_args:
        sketch_kind: dense
        numerics:
          num_iter: 12
          dtype: float32
    - class_path: lightning_sketch.callbacks.IntrinsicDimension
      init_args:
        sketch_kind: dense
        mode: fixed
"""
    callbacks = _parse(tmp_path, text)
    (spec,) = [c for c in callbacks if isinstance(c, HessianSpectrum)]
    (intr,) = [c for c in callbacks if isinstance(c, IntrinsicDimension)]
    assert spec.numerics == SpectrumNumerics(num_iter=12, dtype="float32") and spec.sketch_kind == "dense"
    assert intr.sketch_kind == "dense"


def test_lightning_cli_reads_the_shipped_spectrum_config(tmp_path):
    text = (CONFIGS / "spectrum.yaml").read_text().replace("base_config: base.yaml\n", "")
    (spec,) = [c for c in _parse(tmp_path, text) if isinstance(c, HessianSpectrum)]
    assert spec.numerics.num_iter == 40 and spec.numerics.density_iter == 30 and spec.trace


def test_lightning_cli_reads_the_search_criteria_group(tmp_path):
    text = """trainer:
  callbacks:
    - class_path: lightning_sketch.callbacks.IntrinsicDimension
      init_args:
        sketch_kind: dense
        sketch_dim: 64
        criteria:
          d_min: 4
          delta: 0.05
          reference_score: 0.8
"""
    (intr,) = [c for c in _parse(tmp_path, text) if isinstance(c, IntrinsicDimension)]
    assert intr.criteria == SearchCriteria(d_min=4, delta=0.05, reference_score=0.8)
    assert intr.search is not None and intr.search.d == 4 and intr.target == pytest.approx(0.72)
    with pytest.raises(SystemExit):  # the group's own validation refuses the config at parse time
        _parse(tmp_path, text.replace("delta: 0.05", "delta: -1.0"))
    with pytest.raises(SystemExit):  # the search settings go under `criteria:`
        flat = text.replace(
            "        criteria:\n          d_min: 4\n", "        d_min: 4\n        criteria:\n")
        _parse(tmp_path, flat)


@pytest.mark.parametrize("name, d_min, delta, target", [("intrinsic.yaml", 16, 0.05, 0.9 * 0.98),
                                                         ("minilm.yaml", 64, 0.02, 0.9 * 0.9375)])
def test_lightning_cli_reads_the_shipped_intrinsic_configs(tmp_path, name, d_min, delta, target):
    import yaml

    cfg = yaml.safe_load((CONFIGS / name).read_text())
    (cb,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("IntrinsicDimension")]
    text = yaml.safe_dump({"trainer": {"callbacks": [cb]}}).replace("${seed_everything}", "0")
    (intr,) = [c for c in _parse(tmp_path, text) if isinstance(c, IntrinsicDimension)]
    assert (intr.d_min, intr.delta, intr.target) == (d_min, delta, pytest.approx(target))
    assert intr.search is not None and intr.search.d_max == intr.sketch_dim


# ---------------------------------------------------------------------------- attributes
@pytest.mark.parametrize("mode", ["checkpoint", "inline", "intrinsic"])
def test_every_attribute_is_declared_in_init(tmp_path, mode):
    """A fit adds no attribute that ``__init__`` did not declare (Lightning's own callbacks do the same)."""
    x, y, _ = blobs(n=16)
    if mode == "intrinsic":  # reparametrises the model, so it runs on its own
        callbacks = [IntrinsicDimension(sketch_kind="dense", sketch_dim=8, mode="fixed", plot=False,
                                        criteria=SearchCriteria(target=2.0),
                                        dirpath=str(tmp_path / "id"))]
    else:
        callbacks = [
            GradientSketch(dirpath=str(tmp_path / "gs"), sketch_kind="dense", sketch_dim=8, mode=mode,
                           curvature="none"),
            HessianSpectrum(k=2, sketch_kind="dense", sketch_dim=8, at_steps=[1], every_n_steps=None,
                            probe_batches=1, density=False, plot=False, dirpath=str(tmp_path / "hs")),
        ]
    declared = [set(vars(cb)) for cb in callbacks]
    Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
            callbacks=callbacks).fit(TinyClassifier(), loader(x, y))
    lightning_adds = {"log", "log_dict"}  # Trainer attaches the module's logging methods to every callback
    for cb, before in zip(callbacks, declared):
        assert set(vars(cb)) - before - lightning_adds == set(), type(cb).__name__


def test_the_defaults_that_decide_results_are_pinned():
    """Literal values: changing a callback default that decides what a run computes fails here."""
    import inspect

    def defaults(cls, names):
        sig = inspect.signature(cls.__init__).parameters
        return {n: sig[n].default for n in names}

    assert defaults(GradientSketch, ["sketch_kind", "sketch_dim", "seed", "mode", "dtype", "nan_policy",
                                     "curvature", "save_weights"]) == {
        "sketch_kind": "affd", "sketch_dim": 1024, "seed": 0, "mode": "checkpoint", "dtype": "float32",
        "nan_policy": "skip", "curvature": "auto", "save_weights": True}
    assert defaults(HessianSpectrum, ["k", "sketch_kind", "sketch_dim", "seed", "every_n_steps",
                                      "probe_batches", "density", "trace", "budget"]) == {
        "k": 10, "sketch_kind": "affd", "sketch_dim": 1024, "seed": 0, "every_n_steps": 1000,
        "probe_batches": None, "density": None, "trace": False, "budget": 1.0}
    assert defaults(IntrinsicDimension, ["sketch_kind", "sketch_dim", "seed", "said", "normalize", "mode"]) == {
        "sketch_kind": "qk", "sketch_dim": 1024, "seed": 0, "said": False, "normalize": True, "mode": "search"}
    assert SearchCriteria() == SearchCriteria(d_min=16, delta=0.01, target=None, target_fraction=0.9,
                                              reference_score=None)
