"""engines/manifest.json: what each exported artefact is, and refusal of anything that does not match."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persense.runtime.artefact_names import export_flag
from persense.runtime.errors import PersenseError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
REEXPORT_HINT = "re-export with `persense-export --out {folder}`"
VARIANT_HINT = "`persense-export --out {folder} {flag}` (with the folder's --model) adds it"


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the distributions `names` (those not installed are left out)."""
    import importlib.metadata as md

    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints or axis names for dynamic axes) and dtype of one engine input or output."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TensorSpec:
        """Build from the manifest's JSON form."""
        return TensorSpec(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass
class Artefact:
    """One exported file and everything needed to trust it."""

    file: str
    sha256: str
    kind: str
    precision: str
    model_type: str
    source_checkpoint: str
    opset: int | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Artefact:
        """Build from the manifest's JSON form."""
        fields = dict(data)
        fields["inputs"] = [TensorSpec.from_dict(t) for t in data["inputs"]]
        fields["outputs"] = [TensorSpec.from_dict(t) for t in data["outputs"]]
        fields.setdefault("extra", {})
        return Artefact(**fields)


@dataclass
class Manifest:
    """The artefacts of one engines folder."""

    folder: Path
    model_type: str
    versions: dict[str, str]
    artefacts: dict[str, Artefact]
    format: int = MANIFEST_FORMAT

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to manifest.json."""
        return {
            "format": self.format,
            "model_type": self.model_type,
            "versions": self.versions,
            "artefacts": {name: asdict(a) for name, a in self.artefacts.items()},
        }

    def save(self) -> Path:
        """Write manifest.json into the folder."""
        from persense.runtime.imageio import write_json

        path = self.folder / MANIFEST_NAME
        write_json(path, self.to_json())
        return path

    def digest(self) -> str:
        """Short hash identifying this exact set of artefacts (reported in result.json)."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def artefact(self, name: str) -> Artefact:
        """The named artefact, or a PersenseError naming the fix."""
        if name not in self.artefacts:
            flag = export_flag(name)
            hint = REEXPORT_HINT if flag is None else VARIANT_HINT
            raise PersenseError(
                f"{self.folder}: manifest has no '{name}' artefact; " + hint.format(folder=self.folder, flag=flag)
            )
        return self.artefacts[name]

    def verified_path(self, name: str, expected: Artefact | None = None) -> Path:
        """Path of an artefact after checking its file and external data file exist, their hashes, and its I/O."""
        art = self.artefact(name)
        hint = REEXPORT_HINT.format(folder=self.folder)
        path = self.folder / art.file
        if not path.is_file():
            raise PersenseError(f"{path}: listed in the manifest but missing; {hint}")
        _check_hash(path, art.sha256, hint)
        if art.extra.get("data_file"):  # external weights: the .onnx names the file, the manifest its hash
            data_path = self.folder / art.extra["data_file"]
            if not data_path.is_file():
                raise PersenseError(f"{data_path}: external weights of {art.file} are missing; {hint}")
            _check_hash(data_path, art.extra.get("data_sha256", ""), hint)
        if expected is not None:
            check_io(name, art, expected.inputs, expected.outputs, hint)
        return path


def _check_hash(path: Path, expected: str, hint: str) -> None:
    """Refuse a file whose sha256 is not the manifest's."""
    actual = sha256_file(path)
    if actual != expected:
        raise PersenseError(
            f"{path}: sha256 {actual[:12]}... does not match the manifest ({expected[:12]}...): "
            f"the file was modified or replaced; {hint}"
        )


IoSpec = tuple[list[TensorSpec], list[TensorSpec]]  # an engine family's inputs and outputs


def check_io(name: str, art: Artefact, inputs: list[TensorSpec], outputs: list[TensorSpec], hint: str) -> None:
    """Refuse an artefact whose input/output names, ranks, static dims or dtypes differ from `inputs`/`outputs`."""
    for role, want, have in (("input", inputs, art.inputs), ("output", outputs, art.outputs)):
        have_by_name = {t.name: t for t in have}
        for spec in want:
            got = have_by_name.get(spec.name)
            if got is None:
                raise PersenseError(f"{name}: {role} '{spec.name}' missing from the artefact; {hint}")
            if (
                got.dtype != spec.dtype
                or len(got.shape) != len(spec.shape)
                or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(got.shape, spec.shape))
            ):
                raise PersenseError(
                    f"{name}: {role} '{spec.name}' is {got.dtype}{list(got.shape)}, expected "
                    f"{spec.dtype}{list(spec.shape)}; {hint}"
                )


def tensor_names(specs: list[TensorSpec]) -> list[str]:
    """The names of an engine's inputs or outputs in order (an exporter's input_names / output_names)."""
    return [spec.name for spec in specs]


def load_manifest(folder: str | Path) -> Manifest:
    """Read and sanity-check `folder/manifest.json`."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    hint = REEXPORT_HINT.format(folder=folder)
    if not folder.is_dir():
        raise PersenseError(
            f"{folder}: engines folder not found; export engines first with `persense-export --out {folder}`"
        )
    if not path.is_file():
        raise PersenseError(f"{path}: no manifest; {hint}")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise PersenseError(
                f"{path}: manifest format {data.get('format')} is not the supported {MANIFEST_FORMAT}; {hint}"
            )
        return Manifest(
            folder=folder,
            model_type=data["model_type"],
            versions=data["versions"],
            artefacts={k: Artefact.from_dict(v) for k, v in data["artefacts"].items()},
        )
    except PersenseError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise PersenseError(f"{path}: unreadable manifest ({exc}); {hint}") from exc
