#!/usr/bin/env python3
"""Export a PyTorch model (a torch.nn.Module class) to TorchScript for coevo (issue #16).

The file this writes is what `[model] student = "..."` / `teacher = "..."` in coordinator.toml
take, and what `coevo models --student FILE --teacher FILE --data DIR` checks. Run it in the
environment `scripts/setup-export-env` installs (PyTorch 2.13.0, the version coevo's libtorch is):

    scripts/setup-export-env
    .venv-export/bin/python scripts/export-model.py examples/models/student.py:TinyMobileNet \\
        --kwargs '{"in_channels": 1, "num_classes": 10}' --input-shape 1,28,28 --classes 10 \\
        --out student.pt

What it does, in order:
  1. imports the class (`package.module:Class`, or `path/to/file.py:Class`) and builds it with
     --kwargs (JSON) after seeding torch with --seed, so the initial weights are reproducible;
  2. BatchNorm (unless --batchnorm local): turns every BatchNorm's running_mean/running_var
     buffers into non-trainable parameters. libtorch lists parameters, not buffers, to coevo:
     as parameters the statistics travel with the weights, are averaged across cameras like
     them and are in every checkpoint (models/src/script.rs explains the choice). The module's
     code is unchanged: BatchNorm reads and updates them by attribute either way;
  3. compiles it with torch.jit.script (default: keeps train/eval behaviour of BatchNorm and
     dropout) or torch.jit.trace on an example input (--method trace: for models script cannot
     compile; the mode at trace time is baked in, so it warns when the model has BatchNorm or
     dropout);
  4. saves it, loads it back with torch.jit.load and checks: the output for a batch of the
     example shape is [N, --classes] and equals the original model's in eval mode, and one
     SGD step in train mode runs and changes the trainable parameters.
"""

import argparse
import importlib
import importlib.util
import json
import pathlib
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="the class: package.module:Class, or path/to/file.py:Class")
    p.add_argument("--kwargs", default="{}", help='constructor keyword arguments as JSON, e.g. \'{"num_classes": 62}\'')
    p.add_argument("--input-shape", required=True,
                   help="one example image as C,H,W (the dataset's channels, height, width), e.g. 1,28,28")
    p.add_argument("--classes", type=int, help="expected number of outputs (the dataset's classes); checked")
    p.add_argument("--out", required=True, help="output TorchScript file (.pt)")
    p.add_argument("--method", choices=["script", "trace"], default="script",
                   help="torch.jit.script (default) or torch.jit.trace with the example input")
    p.add_argument("--batchnorm", choices=["average", "local"], default="average",
                   help="average (default): BatchNorm statistics travel with the weights; "
                        "local: left as buffers, each loaded copy keeps its own")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building the model (initial weights)")
    return p.parse_args(argv)


def load_class(spec: str):
    if ":" not in spec:
        sys.exit(f"export-model: {spec!r}: expected module:Class or file.py:Class")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            sys.exit(f"export-model: {path}: no such file")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        sys.exit(f"export-model: {where} has no {name}")


def batchnorm_stats_to_parameters(torch, model) -> int:
    """Re-registers running_mean / running_var of every BatchNorm as a non-trainable
    parameter; returns how many layers were converted."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            if m.momentum is None:
                sys.exit(f"export-model: {name}: BatchNorm with momentum=None (cumulative average) "
                         "depends on num_batches_tracked, which cannot be averaged; set a momentum")
            for stat in ("running_mean", "running_var"):
                value = getattr(m, stat)
                del m._buffers[stat]
                m.register_parameter(stat, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
            n += 1
    return n


def macs_per_image(torch, model, example) -> int:
    """Multiply-accumulates of one image's forward pass through the conv and linear layers
    (coevo's convention, models/src/net.rs: biases, activations, pooling, BatchNorm ignored)."""
    total = [0]

    def hook(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total[0] += out[0].numel() * (m.in_channels // m.groups) * k
        elif isinstance(m, torch.nn.Linear):
            total[0] += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(example[:1])
    for h in handles:
        h.remove()
    return total[0]


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    import torch

    try:
        shape = [int(x) for x in args.input_shape.split(",")]
        assert len(shape) == 3 and all(x > 0 for x in shape)
    except (ValueError, AssertionError):
        sys.exit(f"export-model: --input-shape {args.input_shape!r}: expected C,H,W, e.g. 1,28,28")
    kwargs = json.loads(args.kwargs)
    cls = load_class(args.model)
    torch.manual_seed(args.seed)
    model = cls(**kwargs)
    if not isinstance(model, torch.nn.Module):
        sys.exit(f"export-model: {args.model} is not a torch.nn.Module")
    converted = batchnorm_stats_to_parameters(torch, model) if args.batchnorm == "average" else 0

    example = torch.randn(4, *shape)
    model.eval()
    with torch.no_grad():
        reference = model(example)
    macs = macs_per_image(torch, model, example)
    if args.method == "script":
        compiled = torch.jit.script(model)
    else:
        moded = [m for m in model.modules()
                 if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout))]
        if moded:
            print(f"export-model: warning: tracing bakes the current (eval) mode into {len(moded)} "
                  "BatchNorm/dropout layer(s): they will not behave differently in training. "
                  "Prefer --method script.", file=sys.stderr)
        compiled = torch.jit.trace(model, example)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiled.save(str(out))

    # Reload check: what coevo will load.
    loaded = torch.jit.load(str(out))
    loaded.eval()
    with torch.no_grad():
        got = loaded(example)
    if not isinstance(got, torch.Tensor) or got.dim() != 2 or got.shape[0] != example.shape[0]:
        sys.exit(f"export-model: the module must return logits [N, classes]; got {getattr(got, 'shape', type(got))}")
    if args.classes is not None and got.shape[1] != args.classes:
        sys.exit(f"export-model: the module outputs {got.shape[1]} classes, --classes is {args.classes}")
    if not torch.allclose(got, reference, atol=1e-5, rtol=1e-4):
        sys.exit("export-model: the reloaded module's output differs from the original model's")
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    loaded.train()
    opt = torch.optim.SGD(trainable, lr=0.01)
    loss = torch.nn.functional.cross_entropy(loaded(example), torch.zeros(example.shape[0], dtype=torch.long))
    loss.backward()
    opt.step()
    if not any(not torch.equal(a, b.detach()) for a, b in zip(before, trainable)):
        sys.exit("export-model: one training step did not change any trainable parameter")

    params = sum(p.numel() for p in loaded.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    print(f"wrote {out} ({out.stat().st_size} bytes, {args.method}): {params} parameters "
          f"({n_trainable} trainable), {macs} MACs per image, output [N, {got.shape[1]}], "
          f"{converted} BatchNorm layer(s) with averaged statistics; reloaded and trained one step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
