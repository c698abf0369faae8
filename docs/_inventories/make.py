"""Write the small intersphinx inventories of torch and Python that the docs build reads offline.

The docs cross-reference a few dozen names of torch and the Python standard library. Fetching
their full inventories needs the network, which a build must not; these files hold exactly the
names the docs use, with the real documentation pages they point to, written by Sphinx's own
inventory writer. Run ``python docs/_inventories/make.py`` after adding a reference to a new name.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from sphinx.util.inventory import InventoryFile

HERE = Path(__file__).resolve().parent

# name -> (role, page relative to the documentation root, anchor ("" for the page itself)).
PYTHON = {
    "int": ("class", "library/functions.html", "int"),
    "float": ("class", "library/functions.html", "float"),
    "bool": ("class", "library/functions.html", "bool"),
    "str": ("class", "library/stdtypes.html", "str"),
    "dict": ("class", "library/stdtypes.html", "dict"),
    "list": ("class", "library/stdtypes.html", "list"),
    "tuple": ("class", "library/stdtypes.html", "tuple"),
    "object": ("class", "library/functions.html", "object"),
    "RuntimeError": ("exception", "library/exceptions.html", "RuntimeError"),
    "ValueError": ("exception", "library/exceptions.html", "ValueError"),
    "RuntimeWarning": ("exception", "library/exceptions.html", "RuntimeWarning"),
    "collections.abc.Callable": ("class", "library/collections.abc.html",
                                 "collections.abc.Callable"),
    "collections.abc.Mapping": ("class", "library/collections.abc.html",
                                "collections.abc.Mapping"),
    "collections.abc.Iterable": ("class", "library/collections.abc.html",
                                 "collections.abc.Iterable"),
    "collections.abc.Iterator": ("class", "library/collections.abc.html",
                                 "collections.abc.Iterator"),
    "collections.abc.Sequence": ("class", "library/collections.abc.html",
                                 "collections.abc.Sequence"),
    "typing.Any": ("data", "library/typing.html", "typing.Any"),
    "typing.Literal": ("data", "library/typing.html", "typing.Literal"),
    "typing.Protocol": ("class", "library/typing.html", "typing.Protocol"),
    "abc.ABC": ("class", "library/abc.html", "abc.ABC"),
    "pathlib.Path": ("class", "library/pathlib.html", "pathlib.Path"),
    "os.PathLike": ("class", "library/os.html", "os.PathLike"),
    "None": ("data", "library/constants.html", "None"),
    "dataclasses.dataclass": ("function", "library/dataclasses.html", "dataclasses.dataclass"),
}

TORCH = {
    "torch.Tensor": ("class", "tensors.html", "torch.Tensor"),
    "torch.dtype": ("class", "tensor_attributes.html", "torch.dtype"),
    "torch.device": ("class", "tensor_attributes.html", "torch.device"),
    "torch.Generator": ("class", "generated/torch.Generator.html", "torch.Generator"),
    "torch.nn.Module": ("class", "generated/torch.nn.Module.html", "torch.nn.Module"),
    "torch.nn.Parameter": ("class", "generated/torch.nn.parameter.Parameter.html",
                           "torch.nn.parameter.Parameter"),
    "torch.nn.parameter.Parameter": ("class", "generated/torch.nn.parameter.Parameter.html",
                                     "torch.nn.parameter.Parameter"),
    "torch.nn.BatchNorm2d": ("class", "generated/torch.nn.BatchNorm2d.html",
                             "torch.nn.BatchNorm2d"),
    "torch.nn.SyncBatchNorm": ("class", "generated/torch.nn.SyncBatchNorm.html",
                               "torch.nn.SyncBatchNorm"),
    "torch.nn.modules.batchnorm._BatchNorm": ("class", "generated/torch.nn.BatchNorm2d.html",
                                              "torch.nn.BatchNorm2d"),
    "torch.optim.Optimizer": ("class", "optim.html", "torch.optim.Optimizer"),
    "torch.optim.SGD": ("class", "generated/torch.optim.SGD.html", "torch.optim.SGD"),
    "torch.optim.optimizer.Optimizer": ("class", "optim.html", "torch.optim.Optimizer"),
    "torch.func.functional_call": ("function", "generated/torch.func.functional_call.html",
                                   "torch.func.functional_call"),
    "torch.func.jvp": ("function", "generated/torch.func.jvp.html", "torch.func.jvp"),
    "torch.func.grad": ("function", "generated/torch.func.grad.html", "torch.func.grad"),
    "torch.func.vjp": ("function", "generated/torch.func.vjp.html", "torch.func.vjp"),
    "torch.autograd.grad": ("function", "generated/torch.autograd.grad.html",
                            "torch.autograd.grad"),
    "torch.distributed.ProcessGroup": ("class", "distributed.html",
                                       "torch.distributed.ProcessGroup"),
    "torch.utils.data.DataLoader": ("class", "data.html", "torch.utils.data.DataLoader"),
}


def _domain(entries: dict[str, tuple[str, str, str]]) -> SimpleNamespace:
    objects = [(name, name, role, page, anchor, 1) for name, (role, page, anchor)
               in entries.items()]
    return SimpleNamespace(name="py", get_objects=lambda: iter(objects))


def write(path: Path, project: str, version: str, entries: dict) -> None:
    """Write ``entries`` as the version-2 inventory ``path`` with :meth:`InventoryFile.dump`."""
    domains = [_domain(entries)]
    env = SimpleNamespace(config=SimpleNamespace(project=project, version=version),
                          domains=SimpleNamespace(sorted=lambda: domains))
    builder = SimpleNamespace(get_target_uri=lambda docname: docname)
    InventoryFile.dump(path, env, builder)


if __name__ == "__main__":
    write(HERE / "python.inv", "Python", "3", PYTHON)
    write(HERE / "torch.inv", "PyTorch", "2", TORCH)
    print("wrote", HERE / "python.inv", HERE / "torch.inv")
