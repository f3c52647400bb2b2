"""`fused-resnet tune`: measure, before the first real step, every choice a fused model makes
(the conv path of each layer, the Triton tile of each Triton conv), by running the fused
model's training step and / or inference once on the GPU at the batch, image size, dtype and
layout it will run at. Each choice is written to the tuning cache (fused_resnet.tuning), so
the processes that then train or serve the model start without measuring.

Choices are measured on CUDA devices only: on a machine without one there is nothing to
measure, and the command says so and exits with status 1 (nothing was written).
"""

import contextlib
import time
from typing import Callable, List

import torch
from torch import nn

from fused_resnet.progress import Progress

MODES = ("train", "eval")
CIFAR_PREFIX = "cifar_resnet"  # cifar_resnet<depth>: fused_resnet.models.cifar_resnet


def model_names() -> tuple:
    from fused_resnet.bench import suite

    return suite.MODELS + tuple(f"{CIFAR_PREFIX}{d}" for d in (8, 20, 56))


def build_model(name: str) -> nn.Module:
    """A torchvision ResNet (random weights: the choices depend on shapes, not values) or a
    CIFAR ResNet with projection shortcuts (cifar_resnet<depth>)."""
    if name.startswith(CIFAR_PREFIX):
        from fused_resnet.models import cifar_resnet

        return cifar_resnet(int(name[len(CIFAR_PREFIX):]), shortcut="B")
    import torchvision

    from fused_resnet.bench import suite

    if name not in suite.MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
    return getattr(torchvision.models, name)()


def _layers_with_convs(model: nn.Module) -> List[nn.Module]:
    return [child for child in model.children()
            if any(isinstance(m, nn.Conv2d) for m in child.modules())]


@contextlib.contextmanager
def _layer_progress(model: nn.Module, mode: str, step: Callable[[str], None]):
    """step("<mode> <layer>") after each top-level layer with convs has run forward (every
    choice of a layer is made in its forward)."""
    names = {id(child): name for name, child in model.named_children()}
    handles = [layer.register_forward_hook(
        lambda module, args, out: step(f"{mode} {names[id(module)]}"))
        for layer in _layers_with_convs(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run(model: nn.Module, batch_size: int, image_size: int, dtype: torch.dtype, modes,
        channels_last: bool, device: str, progress: Progress) -> int:
    """Runs `model`, fused, once per mode; returns how many choices were measured."""
    import fused_resnet as fr
    from fused_resnet import tuning
    from fused_resnet.bench.providers import Runner

    model = fr.fuse_(model.to(device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = Runner("fused", model, device, dtype, channels_last)
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    g = torch.Generator().manual_seed(0)
    x = runner.prepare_input(torch.randn(batch_size, 3, image_size, image_size, generator=g))
    target = torch.randint(0, classes, (batch_size,), generator=g).to(device)
    measured = []

    def report(line: str) -> None:
        measured.append(line)
        progress.write(line)

    def layer_done(what: str) -> None:  # called from forward hooks: must return None
        progress.describe(what)
        progress.step()

    with tuning.reporting(report):
        for mode in modes:
            with _layer_progress(model, mode, layer_done):
                if mode == "train":
                    runner.train_step(x, target)
                else:
                    runner.inference(x)
    return len(measured)


def main(args) -> int:
    from fused_resnet import tuning
    from fused_resnet.bench import suite

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not tuning.measured_on(device):
        print(f"fused-resnet tune: nothing to measure on {device}: the conv choices are "
              f"measured on CUDA GPUs only (on a CPU the ops take oneDNN's fused conv where it "
              f"can run, else the library conv, without measuring). Nothing was written.")
        return 1
    modes = MODES if args.mode == "both" else (args.mode,)
    cache = tuning.cache_path()
    layout_name = "channels_last" if args.channels_last else "NCHW"
    print(f"fused-resnet tune: {args.model}, {', '.join(modes)}, {args.dtype}, batch "
          f"{args.batch_size}, {args.image_size}px, {layout_name} on {device}; cache: "
          f"{cache or 'disabled (FUSED_RESNET_TUNING_CACHE=0): choices are not kept'}",
          flush=True)
    model = build_model(args.model)
    progress = Progress(len(_layers_with_convs(model)) * len(modes), unit="layer")
    start = time.perf_counter()
    try:
        count = run(model, args.batch_size, args.image_size, suite.DTYPES[args.dtype],
                    modes, args.channels_last, str(device), progress)
    finally:
        progress.close()
    print(f"fused-resnet tune: {count} choice(s) measured in {time.perf_counter() - start:.1f} s"
          + (f", written to {cache}" if cache and count else
             ("; every choice was already in the cache" if cache else "")), flush=True)
    return 0


def add_parser(sub) -> None:
    from fused_resnet.bench import suite

    p = sub.add_parser(
        "tune", help="measure every conv choice a fused model makes (on a CUDA GPU) and keep "
                     "them in the tuning cache, so later processes start without measuring; "
                     "exits 1 on a machine without CUDA (nothing to measure)")
    p.add_argument("--model", default="resnet50", choices=model_names())
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=sorted(suite.DTYPES), default="bf16",
                   help="bf16/fp16 run under autocast, as training and serving do")
    p.add_argument("--mode", choices=MODES + ("both",), default="both")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--channels-last", dest="channels_last", action="store_true",
                       default=True, help="channels_last input and model (default)")
    group.add_argument("--nchw", dest="channels_last", action="store_false",
                       help="NCHW input and model")
    p.add_argument("--device", default=None, help="default: cuda")
    p.set_defaults(func=main)
