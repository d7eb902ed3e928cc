"""Faults: runs killed with SIGKILL and resumed, checkpoints resumed with another callback set, and zoo
exports interrupted by a full disk or a read-only folder. The rules are written up in docs/faults.md."""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import _fault_run as fault_run  # noqa: E402  (the driver's settings: methods, kill step)

sys.path.remove(str(HERE))


# -- 1. SIGKILL mid-schedule, resume from last.ckpt ---------------------------------------------------------


def assert_same(a, b, where: str = "state") -> None:
    """Exact equality of nested dicts / lists / tensors / numbers (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}"
        assert torch.equal(a, b), (
            f"{where}: values differ (max |diff| {(a.double() - b.double()).abs().max()})"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Run the driver; SIGKILL each method's second run once it is one step past its step-K checkpoint."""
    if not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"):
        pytest.skip("the fault driver forks its runs and kills them with SIGKILL (POSIX only)")
    root = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = (root / "driver.log").open("wb")
    driver = subprocess.Popen(
        [sys.executable, str(HERE / "_fault_run.py"), str(root)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    kills: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 240
        while len(kills) < len(fault_run.METHODS) and driver.poll() is None:
            assert time.monotonic() < deadline, "the killed runs never reached their checkpoint"
            for method in fault_run.METHODS:
                directory = root / method / "killed"
                marker = directory / "hang.pid"
                if method in kills or not marker.is_file():
                    continue
                ckpts = sorted(p.name for p in (directory / "ckpt").glob("*.ckpt"))
                pid = int(marker.read_text())
                os.kill(pid, signal.SIGKILL)  # the run is mid-epoch, one step past its last checkpoint
                kills[method] = {"pid": pid, "checkpoints": ckpts}
            time.sleep(0.05)
        driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's own session: it and its forked runs
            driver.wait()
        log.close()
    output = (root / "driver.log").read_text(errors="replace")
    assert driver.returncode == 0, f"driver failed:\n{output[-6000:]}"
    return root, kills


@pytest.mark.parametrize("method", fault_run.METHODS)
def test_sigkill_then_resume_matches_the_uninterrupted_run(killed_and_resumed, method):
    root, kills = killed_and_resumed
    directory = root / method / "killed"
    k = fault_run.KILL_AFTER
    assert method in kills, f"{method}: the run was never killed"
    # Killed by the signal (not a clean exit), with the step-K checkpoint on disk and nothing later.
    assert json.loads((directory / "died.json").read_text()) == {"signal": signal.SIGKILL, "exit_code": None}
    step_ckpts = [name for name in kills[method]["checkpoints"] if name != "last.ckpt"]
    assert "last.ckpt" in kills[method]["checkpoints"]
    assert step_ckpts[-1].endswith(f"step={k}.ckpt") and len(step_ckpts) == k // fault_run.STEPS_PER_EPOCH
    full = torch.load(root / method / "full" / "state.pt", weights_only=True)
    resumed = torch.load(directory / "state.pt", weights_only=True)
    total = fault_run.MAX_EPOCHS * fault_run.STEPS_PER_EPOCH
    assert full["global_step"] == resumed["global_step"] == total > k + 1
    # Exact: same process layout, one thread, deterministic algorithms, the same batches in the same order.
    assert_same(full["model"], resumed["model"], f"{method} model")
    assert_same(full["callback"], resumed["callback"], f"{method} callback")


def test_killed_runs_acted_mid_schedule(killed_and_resumed):
    """The kill interrupted every schedule: at step K there was still work left to do."""
    root, _ = killed_and_resumed
    k = fault_run.KILL_AFTER

    def callback_state(method: str) -> dict:
        ckpt = torch.load(root / method / "killed" / "ckpt" / f"epoch=1-step={k}.ckpt", weights_only=True)
        assert ckpt["global_step"] == k
        prefix = {
            "pruning": "Pruning{",
            "quantization": "Quantization{",
            "fbs": "FBS{",
            "blockdrop": "BlockDrop{",
        }
        (state,) = [v for key, v in ckpt["callbacks"].items() if key.startswith(prefix[method])]
        return state

    pruning = callback_state("pruning")
    final = torch.load(root / "pruning" / "full" / "state.pt", weights_only=True)["callback"]
    # The checkpoint at step K is written before the prune event at step K, which the killed step then did
    # (and lost): the resumed run must redo it.
    assert pruning["last_event_step"] == k - 2 and final["last_event_step"] == 12
    assert [h["step"] for h in final["history"]] == list(range(0, 13, 2))
    masks = final["masks"]
    assert masks and all(m.dtype == torch.bool for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.2, abs=0.01)  # 80% pruned at the end
    model = torch.load(root / "pruning" / "full" / "state.pt", weights_only=True)["model"]
    for name, mask in masks.items():
        assert not model[name][~mask].any(), f"{name}: a pruned weight is nonzero"
    fbs = callback_state("fbs")
    assert fbs["step"] == k - 1 and 0.5 < fbs["density"] < 1.0  # mid-annealing
    blockdrop = callback_state("blockdrop")
    assert blockdrop["epoch"] == 1 and blockdrop["policy_steps"] == k  # still in the curriculum
    quantization = callback_state("quantization")
    fresh = torch.Generator().manual_seed(3).get_state()
    assert not torch.equal(quantization["generator_state"], fresh)  # the generator has been drawn from


# -- 2. resuming a checkpoint with another set of callbacks --------------------------------------------------
# Lightning keeps each callback's state under its ``state_key`` (class name + the arguments that identify
# it) and, on resume, hands a callback the state stored under its own key; states without a matching
# callback, and callbacks without a stored state, are skipped silently. lit_compress checks the
# checkpoint first (lit_compress._resume): a callback whose arguments changed is refused, dropped state is
# warned about. These tests pin the rules down (docs/faults.md, "Resuming with other callbacks").

STEPS = 4  # SyntheticDataModule(num_train=64, batch_size=16): one epoch


def _tiny_module():
    from lit_compress.models import ImageClassifier

    torch.manual_seed(0)
    return ImageClassifier(
        model="mlp",
        model_kwargs={"hidden": [16, 8], "img_size": 8},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )


def _data():
    from lit_compress.data import SyntheticDataModule

    return SyntheticDataModule(num_train=64, num_val=16, input_shape=(1, 8, 8), batch_size=16, shuffle=False)


def _fit(root: Path, callbacks: list, max_steps: int, ckpt_path: str | None = None, module=None):
    import lightning.pytorch as L

    checkpoint = L.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=STEPS, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[*callbacks, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    module = module if module is not None else _tiny_module()
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return module, trainer


def _pruning(sparsity: float = 0.8, **kwargs):
    from lit_compress.pruning.callback import Pruning

    schedule = {"start_step": 0, "end_step": 6, "frequency": 2}
    return Pruning(sparsity=sparsity, schedule="gradual", schedule_args=schedule, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """A checkpoint at step 4 written by a run with one Pruning callback (events at steps 0 and 2 done)."""
    import lightning.pytorch as L

    class StopAt(L.Callback):  # stop after step 4 of a run planned for 8 (the schedule must fit in the run)
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= STEPS

    root = tmp_path_factory.mktemp("pruned")
    _fit(root, [_pruning(), StopAt()], max_steps=2 * STEPS)
    (ckpt,) = root.glob(f"*step={STEPS}.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    (key,) = [k for k in saved["callbacks"] if k.startswith("Pruning")]
    return ckpt, key, saved["callbacks"][key]


def test_resume_with_an_added_callback_restores_the_others_and_starts_the_new_one_fresh(
    pruned_checkpoint, tmp_path
):
    from lit_compress.quantization.callback import Quantization

    ckpt, key, saved = pruned_checkpoint
    pruning = _pruning()
    quantization = Quantization(method="dorefa", bits=2, verbose=False)
    assert pruning.state_key == key  # same arguments, same key: the state is found
    module, _ = _fit(tmp_path, [pruning, quantization], max_steps=2 * STEPS, ckpt_path=str(ckpt))
    # Pruning continued the checkpointed schedule: its history starts with the saved events.
    assert pruning.history[: len(saved["history"])] == saved["history"]
    assert [h["step"] for h in pruning.history] == [0, 2, 4, 6]
    # Quantization had no state in the checkpoint: it starts at the resumed step, from its constructor.
    assert quantization.layers == ["net.hidden.1"]
    assert (
        isinstance(module.net.hidden[1], torch.nn.Linear)
        and type(module.net.hidden[1]) is not torch.nn.Linear
    )


def test_resume_without_the_callback_warns_that_its_state_is_dropped(pruned_checkpoint, tmp_path):
    from lit_compress.measure import CompressionSummary

    ckpt, _, saved = pruned_checkpoint
    with pytest.warns(UserWarning, match=r"compression state that no callback of this run loads.*Pruning\{"):
        module, trainer = _fit(tmp_path, [CompressionSummary()], max_steps=2 * STEPS, ckpt_path=str(ckpt))
    assert trainer.global_step == 2 * STEPS  # a warning, not an error: dropping pruning can be intended
    weights = dict(module.named_parameters())
    regrown = {name: int(weights[name][~mask].ne(0).sum()) for name, mask in saved["masks"].items()}
    assert all(count > 0 for count in regrown.values()), regrown  # pruned weights trained back to nonzero


def test_resume_with_changed_arguments_is_refused(pruned_checkpoint, tmp_path):
    ckpt, key, _ = pruned_checkpoint
    pruning = _pruning(sparsity=0.9)  # the sparsity is part of the state key
    assert pruning.state_key != key
    with pytest.raises(ValueError, match=r"cannot resume Pruning: the checkpoint holds Pruning state under"):
        _fit(tmp_path, [pruning], max_steps=2 * STEPS, ckpt_path=str(ckpt))
    assert pruning.history == []  # nothing was half-restored


def test_two_callbacks_with_the_same_state_key_are_refused():
    import lightning.pytorch as L

    with pytest.raises(RuntimeError, match="more than one stateful callback of type `Pruning`"):
        L.Trainer(callbacks=[_pruning(), _pruning()], logger=False, enable_checkpointing=False)


def test_two_callbacks_of_one_class_are_matched_by_key_not_by_order(tmp_path):
    def pair():
        return [_pruning(0.5, include=["net.hidden.0"]), _pruning(0.8, include=["net.hidden.1"])]

    first = pair()
    _fit(tmp_path / "a", first, max_steps=2 * STEPS)
    (ckpt,) = (tmp_path / "a").glob(f"*step={2 * STEPS}.ckpt")
    second = pair()[::-1]
    _fit(tmp_path / "b", second, max_steps=2 * STEPS + 1, ckpt_path=str(ckpt))
    by_include = {cb.targets.include: cb for cb in first}
    for cb in second:
        saved = by_include[cb.targets.include]
        assert cb.masks.keys() == saved.masks.keys()
        assert all(torch.equal(cb.masks[n], saved.masks[n]) for n in saved.masks)


def test_module_changing_callbacks_must_be_present_when_resuming(tmp_path):
    """FBS adds predictor parameters to the module: the state_dict no longer fits without it, and back."""
    from lit_compress.gating.fbs_callback import FBS
    from lit_compress.models import ImageClassifier

    def cifarnet():
        torch.manual_seed(0)
        kwargs = {"in_chans": 1, "img_size": 8, "width": 4, "hidden": 16}
        return ImageClassifier(model="cifarnet", model_kwargs=kwargs, optimizer=torch.optim.SGD)

    _fit(tmp_path / "plain", [], max_steps=STEPS, module=cifarnet())
    (plain,) = (tmp_path / "plain").glob("*.ckpt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*predictor"):
        _fit(tmp_path / "r1", [FBS(density=0.5, verbose=False)], 2 * STEPS, str(plain), cifarnet())
    _fit(tmp_path / "gated", [FBS(density=0.5, verbose=False)], max_steps=STEPS, module=cifarnet())
    (gated,) = (tmp_path / "gated").glob("*.ckpt")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*predictor"):
        _fit(tmp_path / "r2", [], 2 * STEPS, str(gated), cifarnet())


# -- 3. zoo export on a full disk or a read-only folder ------------------------------------------------------

export_mod = importlib.import_module("lit_compress.zoo.export")


class _ProxyFile:
    """A file object whose ``write`` goes through the injector."""

    def __init__(self, f, injector):
        self._f, self._injector = f, injector

    def write(self, data):
        self._injector.step("write", None)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


class FaultInjector:
    """Counts the file-system writes (mkdir, create, chmod, write, fsync, rename) and fails the ``fail_at``-th
    with ``OSError(code)``; reads and deletions are never failed (they work on a full disk)."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def __init__(self, monkeypatch, fail_at: int, code: int):
        self.fail_at, self.code, self.count, self.failed = fail_at, code, 0, None
        for name in ("chmod", "fchmod", "fsync", "replace", "rename"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        real_mkdir, real_open, real_fdopen = os.mkdir, os.open, os.fdopen

        def fake_mkdir(path, *args, **kwargs):
            if not os.path.exists(path):  # mkdir(exist_ok=True) of an existing folder writes nothing
                self.step("mkdir", path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", fake_mkdir)

        def fake_open(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS:
                self.step("open", path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _ProxyFile(real_fdopen(*a, **k), self))

    def step(self, name: str, path) -> None:
        self.count += 1
        if self.count == self.fail_at:
            self.failed = name
            raise OSError(self.code, os.strerror(self.code))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            self.step(name, args[0] if args else None)
            return fn(*args, **kwargs)

        return wrapper


def _stub_evaluation(monkeypatch):
    from lit_compress.zoo.card import Metrics

    monkeypatch.setattr(
        export_mod, "evaluate_on", lambda *a, **k: Metrics(top1=0.9, errors=1000, num_examples=10000)
    )


def _export(model, name: str, root: Path, **kwargs):
    return export_mod.export(
        model,
        name=name,
        architecture="mlp",
        architecture_kwargs={"hidden": [8]},
        dataset="mnist",
        recipe=None,
        zoo=root,
        **kwargs,
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every path under ``root`` (hidden ones included) with its bytes (folders: b'/')."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (b"/" if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("existing", [False, True], ids=["new-entry", "overwrite"])
def test_export_failing_at_every_write_step_leaves_the_zoo_unchanged(tmp_path, monkeypatch, code, existing):
    from lit_compress import zoo
    from lit_compress.models import create_model

    _stub_evaluation(monkeypatch)
    torch.manual_seed(0)
    old_model, new_model = create_model("mlp", hidden=[8]), create_model("mlp", hidden=[8])
    root = tmp_path / "zoo"
    name = "mlp-mnist.tiny"
    if existing:
        _export(old_model, name, root)
    card = _export(new_model, name, tmp_path / "elsewhere")  # the card and file to write
    blobs = {f.path: (tmp_path / "elsewhere" / name / f.path).read_bytes() for f in card.files}
    before = _snapshot(root)
    failed_steps = []
    for fail_at in range(1, 100):
        with monkeypatch.context() as patch:
            injector = FaultInjector(patch, fail_at, code)
            try:
                export_mod.write_entry(card, blobs, zoo=root, overwrite=existing)
            except OSError as err:
                failed_steps.append(injector.failed)
                assert err.errno == code and injector.failed is not None
                message = str(err)
                assert str(root) in message and repr(name) in message and "no partial entry" in message
                assert _snapshot(root) == before, f"failure at step {fail_at} ({injector.failed}) left files"
                if not existing and root.exists():
                    root.rmdir()  # the zoo folder itself may have been created (empty): start over without it
                continue
        break  # no step left to fail: the write went through
    else:
        pytest.fail("write_entry never succeeded")
    # Every kind of write step was failed once, each time leaving the zoo as it was.
    expected = {"mkdir", "chmod", "open", "fchmod", "write", "fsync", "replace", "rename"}
    assert expected <= set(failed_steps), failed_steps
    assert zoo.list_models(zoo=root) == [name]
    assert sorted(p.name for p in root.iterdir()) == [name]  # no staging / retired / temp leftovers
    assert (root / name / card.files[0].path).read_bytes() == blobs[card.files[0].path]


def test_export_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    from lit_compress.models import create_model

    _stub_evaluation(monkeypatch)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    root = tmp_path / "zoo"
    with pytest.raises(OSError, match="No space left on device") as info:
        _export(create_model("mlp", hidden=[8]), "mlp-mnist.full", root)
    assert info.value.errno == errno.ENOSPC
    assert "model.safetensors" in str(info.value) and "free some space" in str(info.value)
    assert list(root.iterdir()) == []


def _zoo_export_fit(tmp_path, root: Path):
    import lightning.pytorch as L

    from lit_compress.models import ImageClassifier
    from lit_compress.zoo.from_lightning import ZooExport

    torch.manual_seed(0)
    module = ImageClassifier(model="mlp", model_kwargs={"hidden": [8]}, optimizer=torch.optim.SGD)
    callback = ZooExport(name="mlp-mnist.faulty", dataset="mnist", zoo=str(root), use_best_checkpoint=False)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    from lit_compress.data import SyntheticDataModule

    trainer.fit(module, SyntheticDataModule(num_train=16, num_val=0, batch_size=16))
    return callback


def test_zoo_export_callback_on_a_full_disk_leaves_no_entry(tmp_path, monkeypatch):
    _stub_evaluation(monkeypatch)
    root = tmp_path / "zoo"
    root.mkdir()
    real_replace = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).startswith(str(root)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left on device") as info:
        _zoo_export_fit(tmp_path, root)
    assert "'mlp-mnist.faulty'" in str(info.value) and str(root) in str(info.value)
    assert list(root.iterdir()) == []


def test_zoo_export_callback_into_a_read_only_folder_leaves_no_entry(tmp_path, monkeypatch):
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        pytest.skip(
            "running as root (or without POSIX permissions): chmod is not enforced; EROFS is simulated above"
        )
    _stub_evaluation(monkeypatch)
    root = tmp_path / "zoo"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable") as info:
            _zoo_export_fit(tmp_path, root)
        assert str(root) in str(info.value)
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o755)
