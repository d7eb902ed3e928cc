"""Loading user-supplied state_dict files without ever unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or, for other suffixes, ``torch.load(weights_only=True)``.

    ``weights_only=True`` refuses pickled code objects; a Lightning checkpoint's ``state_dict`` entry is
    unwrapped (its ``net.`` / ``model.`` prefixes are kept: pass the network's own state_dict instead).
    Anything unreadable raises ValueError naming the file (:class:`~lit_compress.zoo.errors.ZooFormatError`,
    a ValueError, for a malformed ``.safetensors``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        # Through the zoo's wrapper: a pickle / torch.save file under this suffix is refused before anything
        # is parsed, and malformed bytes become a ValueError naming the file (not a SafetensorError).
        from lit_compress.zoo.storage import SafetensorsCodec

        return SafetensorsCodec().decode(path.read_bytes(), source=repr(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with the blocked global named
        raise ValueError(
            f"refusing to load {str(path)!r}: it is not a plain tensor file ({err}). "
            "Save weights with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
        ) from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors)")
    return obj
