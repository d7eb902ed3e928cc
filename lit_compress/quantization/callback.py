"""``Quantization``: quantization-aware training (binary / k-bit weights and activations) for any module.

The callback wires quantizers (:mod:`~lit_compress.quantization.quantizers`) and quantized layers
(:mod:`~lit_compress.quantization.modules`) to Lightning's hooks:

- ``__init__``: every option validated; ``method`` presets or explicit quantizers.
- ``setup``: targeted ``Linear`` / ``Conv2d`` layers (FQN globs + types, first and last kept real by
  default) are swapped for ``QuantLinear`` / ``QuantConv2d`` around the *same* Parameter objects. This runs
  before ``configure_optimizers``, the checkpoint restore and the DDP wrap, so nothing is lost and the user's
  state_dict keys do not change: checkpoints hold the real-valued latent weights.
- ``on_train_start`` and ``on_train_batch_end`` (after the optimizer step): latent weights of binary
  quantizers are clipped to their ``clip_latent`` range (``[-1, 1]``).
- The first training batch is checked by forward pre-hooks: a sign-binarised layer whose inputs are all
  ``>= 0`` (e.g. fed by a ReLU) would see only ``+1``; one warning names those layers. (Data-based rather
  than module order, which cannot see functional ``F.relu`` calls.)
- ``state_dict``: the state of the callback-owned generator of stochastic binarisation, so a resumed run
  draws the same binary weights as an uninterrupted one, and the quantized layer names.
- ``teardown`` leaves the swap in place (``trainer.test`` after ``fit`` must see the trained quantized net);
  :meth:`Quantization.export` returns a plain copy with the quantized weights baked in.

Composing with :class:`~lit_compress.pruning.callback.Pruning`: pruned latent weights are exactly zero and the
binary weight quantizers keep exact zeros (``keep_zeros``), so a pruned binary net stays pruned, in training,
in eval and in the export; both callbacks see the same Parameter objects, in any callback order.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lit_compress._flavour import lightning_callback
from lit_compress.quantization.modules import (
    bake_quantized_weights,
    is_quantized,
    quantization_spec,
    quantize_module,
    replace_submodule,
)
from lit_compress.quantization.quantizers import (
    BinaryQuantizer,
    DoReFaActivationQuantizer,
    DoReFaWeightQuantizer,
    IdentityQuantizer,
    Quantizer,
    SignQuantizer,
    XnorActivationQuantizer,
    XnorWeightQuantizer,
    generator_from_bytes,
    generator_to_bytes,
    get_quantizer,
)
from lit_compress.targets import TargetSpec, select_parameters

METHODS = ("binaryconnect", "bnn", "xnor", "dorefa")
SUPPORTED_TYPES = ("Conv2d", "Linear")
RELU_WARNING = "binarising post-ReLU activations makes them all +1"
_PAPERS = {
    "binaryconnect": "BinaryConnect (Courbariaux et al. 2015)",
    "bnn": "Binarized Neural Networks (Hubara et al. 2016)",
    "xnor": "XNOR-Net (Rastegari et al. 2016)",
    "dorefa": "DoReFa-Net (Zhou et al. 2016)",
}


@lightning_callback
class Quantization:
    """Quantization-aware training of any LightningModule's ``Linear`` / ``Conv2d`` layers.

    Args:
        method: a preset (weights / layer inputs):

            - ``binaryconnect``: ``binary`` weights (``stochastic`` picks the mode), real activations;
            - ``bnn``: ``sign`` weights (``keep_zeros``) and ``sign`` inputs, hard-tanh STE;
            - ``xnor``: ``xnor_weight`` (``mean|W|`` per output channel) and ``xnor_activation`` inputs
              (no activation scale ``K``);
            - ``dorefa``: ``dorefa_weight(bits)`` and, when ``activation_bits`` is set,
              ``dorefa_activation(activation_bits)`` inputs (else real inputs).

            Leave it None and give ``weight_quantizer`` / ``activation_quantizer`` instead.
        weight_quantizer, activation_quantizer: registered quantizer names, dotted class paths, spec dicts or
            instances (see :func:`~lit_compress.quantization.quantizers.get_quantizer`); the activation
            quantizer acts on each targeted layer's *input*. Either may be omitted (``identity``).
        weight_quantizer_args, activation_quantizer_args: constructor arguments for names / class paths.
        bits, activation_bits: DoReFa weight bits (2..8, or 1 for DoReFa's binary weights; required for
            ``dorefa``) and activation bits (2..8). Binary methods are 1-bit: leave ``bits`` unset.
        include, exclude, types: which layers (module FQN globs, class names among ``Conv2d``, ``Linear``);
            see :class:`lit_compress.targets.TargetSpec`.
        skip_first_last: keep the first and the last layer of ``types`` in the module (registration order)
            real, weights and input, as BNN / XNOR-Net / DoReFa do for the network's first and last layers.
        stochastic: ``binaryconnect`` only: stochastic binarisation while training.
        seed: seeds the callback-owned generator of stochastic binarisation (identical on every rank).
        verbose: print the quantized layers once (rank zero).
    """

    def __init__(
        self,
        method: str | None = None,
        weight_quantizer: str | dict[str, Any] | Quantizer | None = None,
        weight_quantizer_args: dict[str, Any] | None = None,
        activation_quantizer: str | dict[str, Any] | Quantizer | None = None,
        activation_quantizer_args: dict[str, Any] | None = None,
        bits: int | None = None,
        activation_bits: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        types: list[str] | None = None,
        skip_first_last: bool = True,
        stochastic: bool = False,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("skip_first_last", skip_first_last),
            ("stochastic", stochastic),
            ("verbose", verbose),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"Quantization: {arg} must be true or false, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Quantization: seed must be an int, got {seed!r}")
        if isinstance(types, str) or (types is not None and not types):
            raise ValueError(
                f'Quantization: types must be a non-empty list such as ["Conv2d"], got {types!r}'
            )
        types = list(types) if types is not None else list(SUPPORTED_TYPES)
        unsupported = [t for t in types if t not in SUPPORTED_TYPES]
        if unsupported:
            raise TypeError(
                f"Quantization: layer type(s) {unsupported} are not supported; quantized layers exist for "
                f"{list(SUPPORTED_TYPES)} only (QuantConv2d, QuantLinear): use types: ['Conv2d', 'Linear']"
            )
        self.targets = TargetSpec(
            include=tuple(include or ("*",)), exclude=tuple(exclude or ()), types=tuple(types)
        )
        self.method = method
        self.skip_first_last = skip_first_last
        self.stochastic = stochastic
        self.seed = seed
        self.verbose = verbose
        self.weight_quantizer, self.activation_quantizer = self._build_quantizers(
            method,
            weight_quantizer,
            weight_quantizer_args,
            activation_quantizer,
            activation_quantizer_args,
            bits,
            activation_bits,
        )
        if isinstance(self.weight_quantizer, IdentityQuantizer) and isinstance(
            self.activation_quantizer, IdentityQuantizer
        ):
            raise ValueError(
                "Quantization: nothing to quantize (weights and activations are both 'identity'); choose a "
                f"method in {METHODS} or a weight_quantizer / activation_quantizer"
            )
        # Callback-owned randomness: one CPU generator for every stochastic quantizer, saved in checkpoints.
        self.generator = torch.Generator().manual_seed(seed)
        self._link_generator()
        # State: FQNs of the quantized layers (module order), post-ReLU check.
        self.layers: list[str] = []
        self.relu_warned = False
        self._module: nn.Module | None = None
        self._hooks: list[Any] = []
        self._nonnegative: list[str] = []
        self._checked: set[str] = set()

    # -- construction ------------------------------------------------------------------------------------

    def _build_quantizers(
        self, method, weight, weight_args, activation, activation_args, bits, activation_bits
    ) -> tuple[Quantizer, Quantizer]:
        explicit = weight is not None or activation is not None
        if method is None:
            if not explicit:
                raise ValueError(
                    f"Quantization: give method (one of {METHODS}) or weight_quantizer / activation_quantizer"
                )
            if bits is not None or activation_bits is not None or self.stochastic:
                raise ValueError(
                    "Quantization: bits / activation_bits / stochastic belong to the method presets; with "
                    "explicit quantizers pass them in weight_quantizer_args / activation_quantizer_args"
                )
            return (
                get_quantizer(weight, **(weight_args or {})),
                get_quantizer(activation, **(activation_args or {})),
            )
        if method not in METHODS:
            import difflib

            close = difflib.get_close_matches(str(method), METHODS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Quantization: method must be one of {METHODS}, got {method!r}.{hint}")
        if explicit or weight_args or activation_args:
            raise ValueError(
                f"Quantization: method={method!r} is a preset; do not also pass weight_quantizer / "
                "activation_quantizer (or their _args): use method=None with explicit quantizers instead"
            )
        if self.stochastic and method != "binaryconnect":
            raise ValueError(f"Quantization: stochastic=True is for method='binaryconnect', got {method!r}")
        if method != "dorefa":
            if bits not in (None, 1) or activation_bits is not None:
                raise ValueError(
                    f"Quantization: method {method!r} is 1-bit (binary); bits / activation_bits apply to "
                    f"'dorefa' only, got bits={bits!r}, activation_bits={activation_bits!r}"
                )
            if method == "binaryconnect":
                mode = "stochastic" if self.stochastic else "deterministic"
                return BinaryQuantizer(mode=mode, seed=self.seed), IdentityQuantizer()
            if method == "bnn":
                return SignQuantizer(keep_zeros=True), SignQuantizer()
            return XnorWeightQuantizer(), XnorActivationQuantizer()
        if bits is None:
            raise ValueError(
                "Quantization: method 'dorefa' needs bits (weight bits, 2..8, or 1), e.g. bits: 4"
            )
        weight_q = DoReFaWeightQuantizer(bits=bits)
        activation_q = (
            IdentityQuantizer()
            if activation_bits is None
            else DoReFaActivationQuantizer(bits=activation_bits)
        )
        return weight_q, activation_q

    # -- Lightning hooks ---------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            weight=self.weight_quantizer.describe(),
            activation=self.activation_quantizer.describe(),
            include=list(self.targets.include),
            exclude=list(self.targets.exclude),
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        layers = self._select_layers(pl_module)
        for name in layers:
            module = pl_module.get_submodule(name)
            if is_quantized(module):
                # Swapped already, e.g. trainer.test after fit, or a new callback with the same quantizers:
                # adopt it (so stochastic draws use this callback's generator); anything else is a clash.
                if (module.weight_quantizer, module.input_quantizer) != (
                    self.weight_quantizer,
                    self.activation_quantizer,
                ):
                    raise ValueError(
                        f"Quantization: layer {name!r} is already quantized with weights "
                        f"{module.weight_quantizer.describe()} and inputs "
                        f"{module.input_quantizer.describe()} (by another Quantization callback?); give each "
                        "callback disjoint include / exclude patterns"
                    )
                module.weight_quantizer, module.input_quantizer = (
                    self.weight_quantizer,
                    self.activation_quantizer,
                )
                continue
            replace_submodule(
                pl_module, name, quantize_module(module, self.weight_quantizer, self.activation_quantizer)
            )
        self._module = pl_module
        self.layers = layers
        if stage == "fit" and self.activation_quantizer.sign_binary and not self.relu_warned:
            self._remove_hooks()
            self._checked, self._nonnegative = set(), []
            for name in layers:
                hook = self._make_input_check(name)
                self._hooks.append(pl_module.get_submodule(name).register_forward_pre_hook(hook))
        if self.verbose and stage == "fit" and trainer.is_global_zero:
            print(
                f"[lit_compress] Quantization: {len(layers)} layers quantized "
                f"(weights {self.weight_quantizer.describe()}, "
                f"inputs {self.activation_quantizer.describe()}): {', '.join(layers)}"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self._clip_latent()  # also re-imposes the range on weights restored from a checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._clip_latent()
        if self._hooks and self._seen_inputs():
            self._remove_hooks()
            if self._nonnegative and not self.relu_warned:
                self.relu_warned = True
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"Quantization: {RELU_WARNING}: every input of {self._nonnegative} in the first training "
                    "batch was >= 0, so sign() maps it to a constant. Put a BatchNorm (and hardtanh) before "
                    "these layers instead of a ReLU, or exclude them.",
                    category=UserWarning,
                )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove_hooks()  # the quantized layers stay (see the module docstring)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator.get_state(),
            "layers": list(self.layers),
            "relu_warned": self.relu_warned,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator_state"].to(torch.uint8).cpu())
        saved = list(state_dict.get("layers", []))
        if self.layers and saved and saved != self.layers:
            raise ValueError(
                f"Quantization: the checkpoint quantized layers {saved}, this run quantizes {self.layers}; "
                "use the same include / exclude / types / skip_first_last as the run that wrote it"
            )
        self.relu_warned = bool(state_dict.get("relu_warned", False))

    # -- export ------------------------------------------------------------------------------------------

    def export(self, pl_module: nn.Module, attr: str | None = "net") -> nn.Module:
        """A copy of ``pl_module.<attr>`` (the module itself for ``None``) with quantized weights baked in.

        The copy is in eval mode; its ``weight`` parameters hold the effective (deterministic) quantized
        weights, e.g. exactly ``+-1`` for BinaryConnect/BNN, ``+-alpha_c`` for XNOR, DoReFa grid values (and
        exact zeros where pruned). Layers with real inputs become plain ``nn.Linear`` / ``nn.Conv2d``; layers
        that quantize their inputs (bnn, xnor, dorefa with activation bits) stay ``QuantLinear`` /
        ``QuantConv2d`` with an ``identity`` weight quantizer, so the copy's output equals the quantized
        model's eval output. Its state_dict keys are the original architecture's.
        """
        net = pl_module if attr is None else getattr(pl_module, attr)
        plain = copy.deepcopy(net).eval()
        return bake_quantized_weights(plain)

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards (:class:`~lit_compress.zoo.ZooExport` collects it).

        Keys: ``methods``, ``description``, ``bits`` (weight bits), ``activation_bits`` (32 = real inputs),
        ``network`` (:meth:`export` of ``pl_module.net``; None before setup or without a ``net``): what a zoo
        entry must store, since the module's own weights are the real-valued latent ones, and
        ``quantization`` (``{fqn in the exported network: {"weight": spec, "input": spec}}`` of the layers
        that still quantize their inputs in it, to be re-applied by a loader with
        :func:`~lit_compress.quantization.modules.apply_quantization_spec`).
        """
        method = self.method or f"{self.weight_quantizer.name}+{self.activation_quantizer.name}"
        where = f"{len(self.layers)} layers" if self.layers else "the targeted layers"
        keep = ", first and last layers real" if self.skip_first_last else ""
        paper = _PAPERS.get(self.method or "", "quantization-aware training")
        summary: dict[str, Any] = {
            "methods": [f"quantization:{method}"],
            "description": f"{paper}: weights {self.weight_quantizer.describe()} "
            f"({self.weight_quantizer.bits}-bit), inputs {self.activation_quantizer.describe()} "
            f"({self.activation_quantizer.bits}-bit) on {where}{keep}",
            "bits": self.weight_quantizer.bits,
            "activation_bits": self.activation_quantizer.bits,
            "network": None,
            "quantization": {},
        }
        net = getattr(self._module, "net", None) if self._module is not None else None
        if isinstance(net, nn.Module):
            network = self.export(self._module, attr="net")
            summary["network"] = network
            summary["quantization"] = quantization_spec(network)
        return summary

    # -- mechanics ---------------------------------------------------------------------------------------

    def _link_generator(self) -> None:
        for q in (self.weight_quantizer, self.activation_quantizer):
            if isinstance(q, BinaryQuantizer):
                q.generator = self.generator

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callback; a torch.Generator does not survive torch.multiprocessing.
        state = dict(self.__dict__)
        state["generator"] = generator_to_bytes(self.generator)
        state["_hooks"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.generator = generator_from_bytes(state["generator"])
        self._link_generator()  # the quantizers share the callback's generator again

    def _select_layers(self, pl_module: nn.Module) -> list[str]:
        selected = [n.rsplit(".", 1)[0] for n in select_parameters(pl_module, self.targets)]
        if self.skip_first_last:
            every = [
                n.rsplit(".", 1)[0]
                for n in select_parameters(pl_module, TargetSpec(types=self.targets.types))
            ]
            ends = {every[0], every[-1]}
            kept = [n for n in selected if n not in ends]
            if not kept:
                raise ValueError(
                    f"Quantization: the selection {selected} holds only the first / last layers "
                    f"{sorted(ends)}, which skip_first_last=True keeps real; set skip_first_last: false to "
                    "quantize them"
                )
            selected = kept
        foreign = {
            name: type(module).__name__
            for name in selected
            if not is_quantized(module := pl_module.get_submodule(name))
            and type(module) not in (nn.Linear, nn.Conv2d)
        }
        if foreign:  # all of them at once: a ready exclude list, not one round trip per layer
            listed = ", ".join(f"{n!r} ({t})" for n, t in foreign.items())
            raise TypeError(
                f"Quantization: {len(foreign)} selected layer(s) subclass {'/'.join(self.targets.types)} "
                f"with their own forward, which cannot be quantized: {listed}; exclude them "
                f"(exclude: {sorted(foreign)}) or narrow include"
            )
        return selected

    @torch.no_grad()
    def _clip_latent(self) -> None:
        clip = self.weight_quantizer.clip_latent
        if clip is None or self._module is None:
            return
        for name in self.layers:
            self._module.get_submodule(name).weight.clamp_(*clip)

    def _make_input_check(self, name: str):
        def check(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not module.training or name in self._checked:
                return
            self._checked.add(name)
            if args and isinstance(args[0], torch.Tensor) and bool((args[0] >= 0).all()):
                self._nonnegative.append(name)

        return check

    def _seen_inputs(self) -> bool:
        return bool(self._checked)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
