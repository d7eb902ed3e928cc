"""Zoo entries from Lightning runs: the ``ZooExport`` callback and ``zoo export --checkpoint``."""

from __future__ import annotations

import copy
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_compress._flavour import lightning_callback
from lit_compress.zoo.card import Card
from lit_compress.zoo.export import export


def network_state_from_checkpoint(
    path: str | Path, prefix: str = "net."
) -> tuple[dict[str, torch.Tensor], dict]:
    """The sub-network's state_dict (``prefix`` stripped) and the hyper-parameters of a Lightning checkpoint.

    Loaded with ``weights_only=True``: a checkpoint carrying arbitrary pickled objects is refused.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {str(path)!r} safely (weights_only=True): {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint: it holds a {type(ckpt).__name__}, expected the "
            "dict that Trainer.save_checkpoint writes (state_dict, hyper_parameters, ...)"
        )
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry)")
    net_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not net_state:
        raise ValueError(
            f"{str(path)!r}: no weights under the prefix {prefix!r} (found e.g. {sorted(state)[:3]}); "
            "is the network stored as a different attribute?"
        )
    return net_state, dict(ckpt.get("hyper_parameters") or {})


def _architecture(hparams: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if "model" not in hparams or not isinstance(hparams["model"], str):
        raise ValueError(
            "cannot tell the architecture: the module's hyper-parameters have no 'model' name "
            "(ImageClassifier records it); pass architecture explicitly"
        )
    return hparams["model"], dict(hparams.get("model_kwargs") or {})


def export_checkpoint(
    checkpoint: str | Path, *, config: str | Path, name: str, dataset: str, **export_kwargs: Any
) -> Card:
    """Export the network of an ``ImageClassifier`` checkpoint as zoo entry ``name``."""
    from lit_compress.models import create_model

    state, hparams = network_state_from_checkpoint(checkpoint)
    arch, kwargs = _architecture(hparams)
    model = create_model(arch, **kwargs)
    model.load_state_dict(state)
    return export(
        model,
        name=name,
        architecture=arch,
        architecture_kwargs=kwargs,
        dataset=dataset,
        recipe=config,
        **export_kwargs,
    )


@lightning_callback
class ZooExport:
    """At the end of ``fit``, export the best checkpoint's network (or the final weights) to the zoo.

    Numbers on the card are measured on the dataset's official test set by :func:`lit_compress.zoo.export`.
    ``recipe`` is the YAML config of the run; under ``lit-compress fit --config X`` it defaults to ``X``.
    The module must keep its network as ``model_attr`` and say which architecture it is through its
    hyper-parameters ``model`` / ``model_kwargs`` (as :class:`~lit_compress.models.ImageClassifier` does).
    Compression callbacks describe themselves through ``compression_summary()`` (methods, description, and
    for physically pruned networks the final ``network`` and its ``structure`` spec). ``latency=True`` adds
    measured CPU latency beside the dense reference architecture to the card.
    """

    def __init__(
        self,
        name: str,
        recipe: str | None = None,
        dataset: str | None = None,
        methods: list[str] | None = None,
        bits: int | None = None,
        description: str = "",
        paper: str = "",
        license: str = "Apache-2.0",
        notes: str = "",
        zoo: str | None = None,
        use_best_checkpoint: bool = True,
        model_attr: str = "net",
        overwrite: bool = True,
        codec: str = "safetensors",
        latency: bool = False,
    ):
        super().__init__()
        from lit_compress.zoo.card import NAME_PATTERN

        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"ZooExport(name={name!r}): expected 'arch-dataset.tag' in lower case, "
                "e.g. 'lenet5-mnist.dense'"
            )
        if recipe is not None and not Path(recipe).is_file():
            raise FileNotFoundError(
                f"ZooExport(recipe={recipe!r}): no such file; give the path of the YAML recipe"
            )
        self.name, self.recipe, self.dataset = name, recipe, dataset
        self.methods, self.bits, self.description = methods, bits, description
        self.paper, self.license, self.notes = paper, license, notes
        self.zoo, self.use_best_checkpoint, self.model_attr = zoo, use_best_checkpoint, model_attr
        self.overwrite = overwrite
        self.latency = latency
        from lit_compress.zoo.storage import get_codec

        self.codec = get_codec(codec).name  # unknown codec: clear error now, not after training
        self.card: Card | None = None
        self._start = time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        wall = time.perf_counter() - self._start
        resumed = getattr(trainer, "ckpt_path", None)
        if trainer.global_rank != 0:
            return
        net = getattr(pl_module, self.model_attr, None)
        if not isinstance(net, nn.Module):
            raise AttributeError(
                f"ZooExport: the LightningModule has no nn.Module attribute {self.model_attr!r}"
            )
        arch, kwargs = _architecture(dict(pl_module.hparams))
        summaries = [
            cb.compression_summary() for cb in trainer.callbacks if hasattr(cb, "compression_summary")
        ]
        # A callback that changes the architecture (physical channel removal) hands over the final plain
        # network and its structure spec; its weights are the final ones (a best checkpoint may predate the
        # last removal and not fit the smaller shapes).
        exported = [s for s in summaries if s.get("network") is not None]
        structure = next((s.get("structure") for s in exported if s.get("structure")), None)
        quantized = next((s["quantization"] for s in summaries if s.get("quantization")), None)
        if quantized:  # layers that quantize their inputs are part of the model's function: on the card
            from lit_compress.quantization.structure import quantized_structure

            structure = quantized_structure(quantized, inner=structure)
        gating = next((s["gating"] for s in summaries if s.get("gating")), None)
        bits = self.bits or min((int(s["bits"]) for s in summaries if s.get("bits")), default=32)
        model = copy.deepcopy(exported[-1]["network"] if exported else net).cpu()
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        use_best = self.use_best_checkpoint and checkpoint and not exported
        best = getattr(checkpoint, "best_model_path", "") if use_best else ""
        if best:
            state, _ = network_state_from_checkpoint(best, prefix=f"{self.model_attr}.")
            model.load_state_dict(state)
        datamodule = getattr(trainer, "datamodule", None)
        dataset = self.dataset or getattr(datamodule, "dataset_name", None)
        if dataset is None:
            raise ValueError(
                "ZooExport: pass dataset='mnist' (the datamodule does not say which dataset it is)"
            )
        training = {
            # A resumed run's earlier segments ran in other processes: their time is unknown here.
            "wall_time_s": None if resumed else round(wall, 1),
            **(_resume_note(resumed, wall) if resumed else {}),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "seed": os.environ.get("PL_GLOBAL_SEED"),
            "weights": "best checkpoint" if best else "final",
            "best_score": float(checkpoint.best_model_score)
            if best and checkpoint.best_model_score is not None
            else None,
            "monitor": getattr(checkpoint, "monitor", None) if best else None,
            "device": f"{trainer.strategy.root_device.type} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)",
        }
        methods, description = self.methods, self.description
        if methods is None:  # collected from the compression callbacks of the run
            methods = [m for s in summaries for m in s.get("methods", [])]
        if not description:
            description = "; ".join(s["description"] for s in summaries if s.get("description"))
        self.card = export(
            model,
            name=self.name,
            architecture=arch,
            architecture_kwargs=kwargs,
            dataset=dataset,
            recipe=self.recipe,
            methods=methods,
            bits=bits,
            compression_description=description,
            paper=self.paper,
            license=self.license,
            training=training,
            notes=self.notes,
            zoo=self.zoo,
            data_dir=getattr(datamodule, "data_dir", None),
            overwrite=self.overwrite,
            codec=self.codec,
            latency=self.latency,
            structure=structure,
            gating=gating,
        )
        print(
            f"zoo entry {self.card.name}: top-1 {self.card.metrics.top1:.2%} "
            f"({self.card.metrics.errors}/{self.card.metrics.num_examples} test errors), "
            f"{self.card.params.nonzero:,}/{self.card.params.dense:,} nonzero params"
        )


def _resume_note(checkpoint: object, wall: float) -> dict[str, Any]:
    return {"resumed_from": Path(str(checkpoint)).name, "last_segment_s": round(wall, 1)}
