"""V-NIAH (LongVA's visual needle-in-a-haystack) for imported or trained models.

    # LongVA-style Hugging Face weights (LLaVA layout), its tokenizer.json in the same directory:
    python scripts/eval_vniah.py --hf_dir /models/LongVA-7B --context 4 \\
        --set vniah.haystack=movie.mp4 vniah.prompt_template=qwen2
    # a model trained here (orbax checkpoints under <workdir>/checkpoints), configs from --config:
    python scripts/eval_vniah.py --config configs/tiny.py --checkpoint runs/tiny --tokenizer bytes

--config names a python file whose get_config(arg) returns the run config; the VLMConfig,
TrainConfig, VNIAHConfig and TextNIAHConfig inside it are found by type. The mesh puts all devices
(or --context of them) on the sequence axis. `--set section.field=value` overrides fields
(section: vniah, text_niah, mesh). Results, heatmap and average go to
vniah.output_dir (resumable: finished cells are skipped). See docs/eval.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

import jax
from flax import nnx

from lcv.config import MeshConfig, TextNIAHConfig, TrainConfig, VLMConfig, VNIAHConfig

SECTIONS = {"vniah": VNIAHConfig, "text_niah": TextNIAHConfig, "mesh": MeshConfig}


def load_config(spec: str | None):
  """get_config(arg) of "path.py[:arg]", or None."""
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("lcv_run_config", path)
  if module_spec is None:
    raise FileNotFoundError(f"--config {path!r} is not a python file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def find(config, cls):
  """The first value of type `cls` in a config object (itself, its fields or dict values)."""
  if config is None:
    return None
  if isinstance(config, cls):
    return config
  values = config.values() if isinstance(config, dict) else vars(config).values()
  return next((v for v in values if isinstance(v, cls)), None)


def _parse(text: str, like):
  if isinstance(like, bool):
    return text.lower() in ("1", "true", "yes")
  if isinstance(like, tuple):
    return tuple(type(like[0])(t) for t in text.split(",")) if like else tuple(text.split(","))
  if like is None:
    return None if text.lower() == "none" else float(text)
  return type(like)(text)


def apply_overrides(configs: dict, sets) -> dict:
  """configs {section: dataclass}; sets ["section.field=value", ...] -> updated configs."""
  out = dict(configs)
  for item in sets or ():
    key, eq, value = item.partition("=")
    section, _, field = key.partition(".")
    if not eq or section not in out or not field:
      raise ValueError(f"--set {item!r} must be section.field=value with section in {list(out)}")
    cfg = out[section]
    if field not in {f.name for f in dataclasses.fields(cfg)}:
      raise ValueError(f"--set {item!r}: {type(cfg).__name__} has no field {field!r}")
    out[section] = dataclasses.replace(cfg, **{field: _parse(value, getattr(cfg, field))})
  return out


def from_hf(hf_dir: str, mesh, pool: int, attention_impl: str | None):
  """A `VLM` from a LLaVA-layout Hugging Face directory (LongVA's release: pool 2, 144 tokens)."""
  from lcv.models import checkpoints

  overrides = {} if attention_impl is None else {"attention_impl": attention_impl}
  _, model = checkpoints.vlm_from_hf(hf_dir, pool=pool, **overrides)
  return _place(model, mesh)


def from_checkpoint(workdir: str, vlm_cfg: VLMConfig, train_cfg: TrainConfig, mesh, step=None):
  """The `VLM` of a training run's orbax checkpoint (latest step unless `step`)."""
  from lcv.models import vlm
  from lcv.parallel import rules as rules_lib
  from lcv.train import checkpoint as checkpoint_lib
  from lcv.train import state as state_lib

  model_fn = lambda: vlm.VLM(vlm_cfg, rngs=nnx.Rngs(0))
  setup = state_lib.setup(
    model_fn, train_cfg.optimizer, train_cfg.steps, mesh, rules_lib.RULES, train_cfg.seed
  )
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  try:
    step, state, _ = ckpt.restore(setup.abstract, step)
  finally:
    ckpt.close()
  return state_lib.merge(setup.graphdef, state), step


def _place(model, mesh):
  """Replicate a host-loaded model over the mesh."""
  target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, target), nnx.state(model)))
  return model


def build(argv=None, description=__doc__):
  """Parse the command line; returns (args, configs, model, tokenizer, mesh, model_key)."""
  from lcv.data import tokenizer as tokenizer_lib
  from lcv.parallel import mesh as mesh_lib

  ap = argparse.ArgumentParser(
    description=description, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--config", help="configs/x.py[:arg] with get_config(arg)")
  ap.add_argument("--hf_dir", help="Hugging Face LLaVA-layout directory (LongVA)")
  ap.add_argument("--checkpoint", help="training workdir holding checkpoints/")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--pool", type=int, default=2, help="--hf_dir projector pool (LongVA: 2)")
  ap.add_argument("--attention_impl", help="override the model's attention (e.g. ring)")
  ap.add_argument("--tokenizer", help="'bytes' or a tokenizer directory (default: --hf_dir)")
  ap.add_argument(
    "--context", type=int, default=-1, help="devices on the context axis (-1: all of them)"
  )
  ap.add_argument("--devices", type=int, default=None, help="use the first N devices only")
  ap.add_argument("--set", nargs="*", default=[], help="section.field=value overrides")
  ap.add_argument("--no_progress", action="store_true")
  args = ap.parse_args(argv)
  if bool(args.hf_dir) == bool(args.checkpoint):
    ap.error("pass exactly one of --hf_dir (imported weights) or --checkpoint (a run here)")
  run_cfg = load_config(args.config)
  configs = {name: find(run_cfg, cls) or cls() for name, cls in SECTIONS.items()}
  # Evaluation runs one sequence at a time: every device goes to the sequence (context) axis,
  # whatever mesh the run trained on (orbax reshards the checkpoint on restore).
  configs["mesh"] = MeshConfig(data=1, fsdp=1, context=args.context, tensor=1)
  configs = apply_overrides(configs, args.set)
  mesh = mesh_lib.make_mesh(configs["mesh"], jax.devices()[: args.devices])
  if args.hf_dir:
    model = from_hf(args.hf_dir, mesh, args.pool, args.attention_impl)
    key = f"{os.path.abspath(args.hf_dir)}@pool{args.pool}"
  else:
    vlm_cfg, train_cfg = find(run_cfg, VLMConfig), find(run_cfg, TrainConfig)
    if vlm_cfg is None or train_cfg is None:
      ap.error(
        f"--checkpoint needs a --config holding a VLMConfig and a TrainConfig ({args.config})"
      )
    if args.attention_impl:
      decoder = dataclasses.replace(vlm_cfg.decoder, attention_impl=args.attention_impl)
      vlm_cfg = dataclasses.replace(vlm_cfg, decoder=decoder)
    model, step = from_checkpoint(args.checkpoint, vlm_cfg, train_cfg, mesh, args.step)
    key = f"{os.path.abspath(args.checkpoint)}@{step}"
  tok_path = args.tokenizer or args.hf_dir
  if not tok_path:
    ap.error("--tokenizer is required with --checkpoint ('bytes' or a tokenizer directory)")
  return args, configs, model, tokenizer_lib.load(tok_path), mesh, key


def main(argv=None):
  from lcv.eval import vniah

  args, configs, model, tokenizer, mesh, key = build(argv)
  results = vniah.run(
    configs["vniah"], model, tokenizer, model_key=key, mesh=mesh, progress=not args.no_progress
  )
  print(f"V-NIAH average {results.average():.3f} over {len(results.records)} cells; "
        f"{configs['vniah'].output_dir}/heatmap.png")  # fmt: skip


if __name__ == "__main__":
  sys.exit(main())
