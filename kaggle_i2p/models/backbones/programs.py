"""Exported programs as backbones: `library: export` (a `torch.export` ExportedProgram saved with
`torch.export.save`, `.pt2`) and `library: torchscript` (a `torch.jit.trace` / `torch.jit.script` file). They serve any
tower its own code could export: fused backbones, custom heads, a patch-stride trick, the whole image -> 384 tower.

The program is the model: its code and weights are the file `arch` names, so the tower's own keys are only those of a
head on top (`head: {type: none}` when the program gives the embedding itself, and then no `checkpoint`). The program
must take a float (B, 3, H, W) batch of any batch size; sizes other than the one it was made at work only when it was
exported with dynamic height and width (`torch.export.Dim`) or its traced code is size-generic; otherwise `arch` names
one program per resolution with `{resolution}` in its file name (`eva_{resolution}.pt2`: eva_224.pt2, eva_336.pt2),
each run on its own views, all one tower (one normalised mean over its views). The architecture check
runs it on fake tensors (shapes only, no compute) at every view's resolution and two batch sizes, so a program that
cannot run a view fails before any weight is used.

What each format executes: an ExportedProgram runs no Python, only the ATen graph in the file; TorchScript runs the
TorchScript code saved in the file (its own interpreter, no Python). Pickled models stay refused everywhere: torch's
export loader unpickles some records (its sample inputs, pickled constants) and falls back to `weights_only=False`
when one does not load safely; here it loads under `safe_load.guarded_unpickling`, so such a record is refused, never
run. Both formats are zip archives, checked for compressed members past a bound (a zip bomb) before they inflate.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...core.errors import EntryFieldError
from ...core.fileio import file_identity
from ...core.registry import LIBRARIES, register_library
from ..checkpoints import TowerLoadError, checkpoint_sha256, program_format
from ..safe_load import UnsafeFileError, check_archive, guarded_unpickling
from .base import Backbone, BackboneLibrary, Candidate, Shapes

PROBE_SIZE = 224  # the size a program that does not say its own is first run at, to read its output's width
PROBE_SIZES = (224, 336, 384, 448, 256, 288, 320, 512, 192, 160, 128, 112, 96, 64, 32)  # then these, in turn


def _fake_run(program: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The program's output shape for an input of `shape`, on fake tensors: shapes only, nothing computed. A program
    whose graph asks a value of its data (a traced nn.MultiheadAttention keeps its `torch.equal` test) is run once
    for real on zeros instead."""
    import logging

    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a size the program cannot take is our answer, not torch's log's traceback
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            out = program(torch.empty(shape, device="cpu"))
    except DataDependentOutputException:
        with torch.no_grad():
            out = program(torch.zeros(shape, device="cpu"))
    finally:
        fake_log.setLevel(level)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the program returns a {type(out).__name__}, not one (B, D) tensor")
    return tuple(out.shape)


FORMAT_ADVICE = {  # a file no program library reads, by what `program_format` finds it to be
    "pickle": ("it is a torch.save pickle, which is never unpickled here (it would run code): save the model's "
               "state_dict and serve it with its library (timm, open_clip, transformers), or export it with "
               "torch.export.save"),
    "unknown": "it is not a zip archive as torch.export.save and torch.jit.save write",
}


RESOLUTION = "{resolution}"  # in a program's file name: one program per view resolution


class ExampleProgram(nn.Module):
    """A tiny conv trunk giving 24 pooled features at any size: what each program library's example holds."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.GELU(), nn.Conv2d(12, 24, 3, 2, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images).mean(dim=(2, 3))


def write_example_program(path: Path, library: str = "export") -> Path:
    """`ExampleProgram` saved as `library` saves it: torch.export with a dynamic batch and size, traced TorchScript,
    or an ONNX graph (torch.onnx.export, dynamic batch and size)."""
    model, example = ExampleProgram().eval(), torch.randn(2, 3, 64, 64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if library == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch", 2: "h", 3: "w"}, "features": {0: "batch"}},
                              dynamo=False)
    elif library == "export":
        dim = torch.export.Dim
        dims = {"images": {0: dim("batch"), 2: dim("h", min=16, max=1024), 3: dim("w", min=16, max=1024)}}
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dims), str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.trace(model, example).save(str(path))
    return path


class ProgramBackbone(nn.Module):
    """A loaded program as a backbone: one program, or one per resolution (`{resolution}` in `arch`), run on the
    images' own size. Programs are held outside the module tree, so their weights are never the tower's keys (they
    are the program files'); each moves to the device of the images it is given, once."""

    def __init__(self, arch: str, programs: dict[int | None, Any], library: ProgramLibrary):
        super().__init__()
        self.__dict__["programs"] = programs  # not submodules: no state_dict keys, no .to() of our own
        self.arch, self._library = arch, library

    def _program(self, size: int) -> tuple[int | None, Path]:
        """Which program runs images of this size (its key in `programs`, loaded now if new), and its file."""
        if RESOLUTION not in self.arch:
            return None, Path(self.arch)
        path = self._library.resolution_file(self.arch, size)
        if size not in self.programs:
            if not path.is_file():
                raise ValueError(f"no program for resolution {size}: {path} not found (one file per resolution "
                                 f"the tower lists, named as {Path(self.arch).name})")
            self.programs[size] = self._library.program(path)
        return size, path

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        key, path = self._program(images.shape[-1])
        program = self.programs[key]
        if images.is_meta:  # the architecture check: the shape it would give, at this size and another batch size
            return torch.empty(self._library.output_shape(program, tuple(images.shape), path), device="meta")
        if self._library.device_of(program) != images.device:
            program = self.programs[key] = self._library.to_device(program, images.device, path)
        return program(images.float())  # autocast, when on, still casts its ops


class ProgramLibrary(BackboneLibrary):
    """What both program formats share: `arch` is the program file (or one per resolution), whose weights are the
    backbone's."""

    holds_weights: ClassVar[bool] = True
    shape_hint: ClassVar[str] = ""
    label: ClassVar[str] = ""  # the format's own name, for messages
    saver: ClassVar[str] = ""  # the call that writes the format, for messages
    file_kind: ClassVar[str] = ""  # what a file of the format is, for messages ("a TorchScript file")
    _loaded: dict[str, Any]

    def __init__(self) -> None:
        self._loaded = {}  # by file identity: the checks and the load read a program once per process

    def arch_is_path(self, arch: str) -> bool:
        return True

    @staticmethod
    def resolution_file(arch: str, resolution: int) -> Path:
        """The program file of one resolution, for an `arch` with `{resolution}` in its name."""
        return Path(arch.replace(RESOLUTION, str(resolution)))

    def arch_files(self, arch: str, resolutions: Sequence[int]) -> tuple[str, ...]:
        if RESOLUTION not in arch:
            return (arch,)
        return tuple(str(self.resolution_file(arch, r)) for r in sorted(set(resolutions)))

    def resolution_files(self, arch: str) -> dict[int, Path]:
        """Every file on disk an `arch` with `{resolution}` names, by resolution."""
        name = Path(arch).name
        head, tail = name.split(RESOLUTION, 1)
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
        folder = Path(arch).parent
        found = {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.fullmatch(p.name))} \
            if folder.is_dir() else {}
        return dict(sorted(found.items()))

    def arch_identity(self, arch: str) -> Any:
        """The program file's sha256 (its code and weights are the tower's); with `{resolution}`, every such file's."""
        if RESOLUTION not in arch:
            return {"program_sha256": checkpoint_sha256(Path(arch))}
        return {"program_sha256": {str(r): checkpoint_sha256(p) for r, p in self.resolution_files(arch).items()}}

    def program(self, path: Path) -> Any:
        """The program in `path` on the CPU, read once per process (the checks and the run share it)."""
        key = file_identity(path)
        if key not in self._loaded:
            with torch.device("cpu"):
                self._loaded[key] = self.load(path)
        return self._loaded[key]

    def load(self, path: Path) -> Any:
        """The program read from `path` onto the CPU, no Python object in it unpickled; a file of another format, a
        zip bomb, a pickle that would run code or a damaged archive is one message saying which."""
        if not self.is_format(path):
            other = next((lib for lib in LIBRARIES if isinstance(lib, ProgramLibrary) and lib.is_program_file(path)),
                         None)  # the registered library whose format the file is
            advice = f"it is {other.file_kind}: use library: {other.name}" if other is not None \
                else FORMAT_ADVICE[program_format(path)]
            raise TowerLoadError(f"{path.name} is not a {self.label} file: {advice}")
        check_archive(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notes, not the user's concern
                return self.read(path)
        except UnsafeFileError as err:
            raise UnsafeFileError(f"{path.name}: refused, {err}") from err
        except Exception as err:  # noqa: BLE001 - whatever the format's reader raises on a damaged file
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise TowerLoadError(f"{path.name} cannot be read as a {self.label} file ({type(err).__name__}: "
                                 f"{lines[0][:300] if lines else ''}); save it again with {self.saver}") from err

    def read(self, path: Path) -> Any:
        """The program in `path`, a file of this format."""
        raise NotImplementedError

    def device_of(self, program: Any) -> torch.device:
        tensor = next(iter(program.state_dict().values()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def to_device(self, program: Any, device: torch.device, path: Path) -> Any:
        """The program on `device` (the CPU copy dropped from the memo: one copy held)."""
        self._loaded.pop(file_identity(path), None)
        return self.move(program, device)

    def move(self, program: Any, device: torch.device) -> Any:
        """The program moved to `device`, as its format moves one."""
        return program.to(device)

    def static_size(self, program: Any) -> tuple[int, int] | None:
        """The (H, W) the program was made for when it takes no other, else None (unknown or dynamic)."""
        return None

    def shape_of(self, program: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The program's output shape for an input of `shape`, with no compute where the format allows (fake
        tensors for torch's formats)."""
        return _fake_run(program, shape)

    def is_format(self, path: Path) -> bool:
        """Whether the file is a program of this format (read from its container, not its name)."""
        return program_format(path) == self.name

    def is_program_file(self, path: Path) -> bool:
        return path.is_file() and self.is_format(path)

    def output_shape(self, program: Any, shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
        """The program's output shape for `shape`, checked at one more batch size (a run's last batch is smaller);
        a size or batch it cannot take is one clear error."""
        outcomes: dict[int, tuple[int, ...] | Exception] = {}
        for batch in (shape[0], shape[0] + 1):
            try:
                outcomes[batch] = self.shape_of(program, (batch, *shape[1:]))
            except Exception as err:  # noqa: BLE001 - whatever the program raises is the user's message
                outcomes[batch] = err
        failed = {b: e for b, e in outcomes.items() if isinstance(e, Exception)}
        if failed:
            batch, err = next(iter(failed.items()))
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            ran = [b for b in outcomes if b not in failed]
            what = f"takes a batch of {ran[0]} but not of {batch}" if ran else "does not run"
            raise ValueError(f"{path.name} {what} ({first}). {self.shape_hint}") from err
        out = outcomes[shape[0]]
        if len(out) != 2 or out[0] != shape[0]:
            raise ValueError(f"{path.name} returns {out} for a batch of {shape[0]}: a tower's program returns "
                             "(B, D) features or embeddings")
        return out

    def propose(self, shapes: Shapes, head_in: int | None, source: Path, arch: str | None = None
                ) -> Iterator[Candidate]:
        """The file itself, when it is a program of this format (its width the deep check reads)."""
        if not self.is_format(source):
            return
        program = self.program(source)
        static = self.static_size(program)
        size = static[0] if static else self.runnable_size(program)
        if size is None:
            raise EntryFieldError(f"a {self.label} program that runs at none of the sizes "
                                  f"{', '.join(map(str, PROBE_SIZES))}: pass the size it was made at as "
                                  "native_resolution in the entry", "native_resolution")
        width = self.shape_of(program, (2, 3, size, size))[-1]
        notes = ("the program's preprocessing is its training code's: mean/std above are ImageNet's placeholders",
                 *((f"the program gives {width}-d outputs: it needs a head (its own file: inspect PROGRAM HEAD_FILE) "
                    f"or --embedding-dim {width}",) if head_in is None and width != self.embedding_hint else ()))
        entry = {"library": self.name, "arch": str(source),
                 **({"native_resolution": size} if not static and size != PROBE_SIZE else {})}
        yield Candidate(entry, f"a {self.label} program giving {width}-d outputs at {size} px", {
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
            "resolutions": [size]}, notes)

    embedding_hint: ClassVar[int] = 384  # the width a program that is the whole tower gives

    def runnable_size(self, program: Any) -> int | None:
        """The first of PROBE_SIZES the program runs at, on fake tensors (a traced program keeps its trace's size)."""
        for size in PROBE_SIZES:
            try:
                self.shape_of(program, (2, 3, size, size))
            except Exception:  # noqa: BLE001 - not this size
                continue
            return size
        return None

    example_file: ClassVar[str] = ""  # the example program's file name

    def example(self, folder: Path, features: str | None = None) -> str | None:
        """`ExampleProgram` saved as this library's users save theirs."""
        return write_example_program(Path(folder) / self.example_file, self.name).name if features is None else None

    def build(self, arch: str, native_resolution: int | None, classes: int, **choices: Any) -> Backbone:
        """The program(s) `arch` names, the width read from one's output on fake tensors (no compute)."""
        if classes:
            raise EntryFieldError(f"a {self.name} program gives its own output; this tower's kind wants {classes} "
                                  "class logits from its backbone", "kind")
        if RESOLUTION in arch:  # one program per resolution: the width is read from the first; the rest load as used
            files = self.resolution_files(arch)
            if not files:
                raise EntryFieldError(f"no file named as {Path(arch).name} in {Path(arch).parent}", "arch")
            size, path = next(iter(files.items()))
            programs: dict[int | None, Any] = {size: self.program(path)}
            height = width = size
        else:
            path = Path(arch)
            programs = {None: self.program(path)}
            size = native_resolution or self.static_size(programs[None]) or PROBE_SIZE
            height, width = (size, size) if isinstance(size, int) else size
        try:
            out = self.shape_of(next(iter(programs.values())), (2, 3, height, width))
        except Exception as err:
            raise EntryFieldError(f"{path.name} does not run on a (2, 3, {height}, {width}) batch ({err}); set "
                                  "native_resolution to the size it was made at", "native_resolution") from err
        return Backbone(ProgramBackbone(arch, programs, self), int(out[-1]))


class ExportLibrary(ProgramLibrary):
    """`torch.export` programs (`.pt2`): an ATen graph and its weights, no Python."""

    name = "export"
    example_file = "tiny.pt2"
    label = "torch.export"
    saver = "torch.export.save"
    file_kind = "a torch.export program"
    arch_example = "towers/eva02_l.pt2"
    shape_hint = ("Export it with a dynamic batch and, for other sizes, dynamic height and width: "
                  "torch.export.export(model, (x,), dynamic_shapes={'x': {0: Dim('batch'), 2: 14 * Dim('h'), "
                  "3: 14 * Dim('w')}}); or export one program per resolution and name them in arch with {resolution} "
                  "(tower_{resolution}.pt2)")

    def read(self, path: Path) -> Any:
        with path.open("rb") as handle, guarded_unpickling():  # a buffer: export takes any name, not only *.pt2
            program = torch.export.load(handle)
        module = program.module()
        module.__dict__["_i2p_exported"] = program  # kept to move it with export's own device pass
        return module

    def static_size(self, program: Any) -> tuple[int, int] | None:
        exported = program.__dict__["_i2p_exported"]
        inputs = [n for n in exported.graph.nodes if n.op == "placeholder"
                  and n.name in exported.graph_signature.user_inputs]
        value = inputs[0].meta.get("val") if len(inputs) == 1 else None
        if value is None or value.ndim != 4:
            raise ValueError("a tower's program takes one (B, 3, H, W) image batch")
        height, width = value.shape[2], value.shape[3]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def move(self, program: Any, device: torch.device) -> Any:
        """export's own device pass: the graph's device arguments move with the weights."""
        from torch.export.passes import move_to_device_pass

        moved = move_to_device_pass(program.__dict__["_i2p_exported"], device)
        module = moved.module()
        module.__dict__["_i2p_exported"] = moved
        return module


class TorchScriptLibrary(ProgramLibrary):
    """`torch.jit` files: TorchScript code and its weights, run by TorchScript's interpreter."""

    name = "torchscript"
    example_file = "tiny.pt"
    label = "TorchScript"
    saver = "torch.jit.save"
    file_kind = "a TorchScript file"
    arch_example = "towers/clip_traced.pt"
    shape_hint = ("A traced program is made for its trace's sizes: trace one per resolution and name them in arch "
                  "with {resolution} (tower_{resolution}.pt), or list only the resolution it was traced at")

    def read(self, path: Path) -> Any:
        return torch.jit.load(str(path), map_location="cpu").eval()


class OnnxProgram:
    """An ONNX graph in an onnxruntime session, called as a program is: a float (B, 3, H, W) tensor in, the graph's
    first output as a tensor out, on the images' device. On a GPU the session runs on the CUDA execution provider
    (the batch crosses the host once each way); without it, on the CPU, said once."""

    def __init__(self, path: Path, device: torch.device):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
            else:
                warnings.warn(f"{path.name}: onnxruntime has no CUDA execution provider here (install "
                              "onnxruntime-gpu); the graph runs on the CPU", stacklevel=2)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's own warnings (unused initializers ...) are not the user's
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.path, self.device = path, device
        self.input = self.session.get_inputs()[0]
        self.output = self.session.get_outputs()[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input.name: images.detach().float().cpu().contiguous().numpy()}
        out = self.session.run([self.output.name], feed)[0]
        return torch.from_numpy(out).to(images.device)


class OnnxLibrary(ProgramLibrary):
    """ONNX graphs (`torch.onnx.export`, or any exporter) run by onnxruntime: the `[onnx]` extra."""

    name = "onnx"
    example_file = "tiny.onnx"
    label = "ONNX"
    saver = "torch.onnx.export"
    file_kind = "an ONNX graph"
    arch_example = "towers/eva02_l.onnx"
    shape_hint = ("Export it with a dynamic batch and, for other sizes, dynamic height and width: "
                  "torch.onnx.export(model, (x,), 'tower.onnx', input_names=['images'], dynamic_axes={'images': "
                  "{0: 'batch', 2: 'h', 3: 'w'}}); or export one graph per resolution and name them in arch with "
                  "{resolution} (tower_{resolution}.onnx)")

    def is_format(self, path: Path) -> bool:
        if path.suffix.lower() != ".onnx":
            return False
        with path.open("rb") as handle:  # a ModelProto starts with a protobuf field tag, never a zip's "PK"
            return handle.read(2) not in (b"PK", b"")

    def read(self, path: Path) -> Any:
        try:
            import onnxruntime  # noqa: F401 - the extra this library needs
        except ImportError as err:
            raise TowerLoadError(f"{path.name}: library onnx needs onnxruntime: pip install kaggle_i2p[onnx] (or "
                                 "onnxruntime-gpu on a GPU machine)") from err
        program = OnnxProgram(path, torch.device("cpu"))
        if len(program.session.get_inputs()) != 1:
            raise ValueError("a tower's graph takes one (B, 3, H, W) image batch; this one takes "
                             f"{len(program.session.get_inputs())} inputs")
        return program

    def device_of(self, program: Any) -> torch.device:
        return program.device

    def move(self, program: Any, device: torch.device) -> Any:
        """A session on `device`'s execution provider: an onnxruntime session does not move, a new one is made."""
        return program if program.device == device else OnnxProgram(program.path, device)

    def static_size(self, program: Any) -> tuple[int, int] | None:
        shape = program.input.shape
        if len(shape) != 4:
            raise ValueError(f"a tower's graph takes one (B, 3, H, W) image batch; its input is {shape}")
        height, width = shape[2], shape[3]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def shape_of(self, program: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape the graph declares for `shape`, from its inputs and outputs alone (no compute); a graph
        whose output width is not declared runs once on zeros."""
        declared = program.input.shape
        if len(declared) != 4 or isinstance(declared[1], int) and declared[1] != 3:
            raise ValueError(f"the graph's input is {declared}, not a (B, 3, H, W) image batch")
        for axis, (want, given) in enumerate(zip(declared, shape, strict=True)):
            if isinstance(want, int) and want != given:
                what = "batch" if axis == 0 else "height" if axis == 2 else "width" if axis == 3 else "channels"
                raise ValueError(f"the graph takes a {what} of {want} only, not {given}")
        out = program.output.shape
        if len(out) != 2:
            raise ValueError(f"the graph's output is {out}: a tower's graph gives (B, D) features or embeddings")
        if isinstance(out[1], int):
            return (shape[0], out[1])
        return tuple(program(torch.zeros(shape)).shape)


EXPORT = register_library(ExportLibrary())
TORCHSCRIPT = register_library(TorchScriptLibrary())
ONNX = register_library(OnnxLibrary())
