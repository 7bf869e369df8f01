"""Config files, big_vision style, validated against one schema.

A config file is a Python module with `get_config(arg)` returning an
`ml_collections.ConfigDict`; it is named as `configs/x.py:key=value,...` and
overridden with `--config.a.b=value`. Every config starts from
`default_config()`, the schema: `check_config` rejects any key the schema
lacks and any value of the wrong type, naming the key, before anything is
compiled.

Overrides are parsed here, not by ml_collections' flag parser, so that every
key the schema has can be set from the command line (lists such as `mesh`
and `optim.schedule` included): a string key takes the text as it is, a
bool/int/float key parses it, anything else reads it as a Python literal.
"""

import ast
import types

import ml_collections

from lit_navit import fs
from lit_navit import optim
from lit_navit import sharding
from lit_navit import xla_options
from lit_navit.data import pipeline
from lit_navit.data import sources
from lit_navit.models import decoder
from lit_navit.models import two_towers


def default_config() -> ml_collections.ConfigDict:
  """Every key a training config may set, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32  # global rows; each row packs up to input.images_per_row images
  # Start from another run's params (a workdir or step directory): those whose
  # path matches init_params are loaded, the rest initialised (LiT).
  c.init_from = ''
  c.init_params = '.*'

  c.input = pipeline.default_config()
  c.model = two_towers.default_config()  # model.loss picks sigmoid (ring) or softmax
  c.optim = optim.default_config()
  c.update(sharding.default_config())  # mesh, sharding_rules

  c.checkpoint = ml_collections.ConfigDict(dict(
      every=200,        # save every N steps
      keep=3,           # keep the newest K
      keep_every=0,     # and every M-th step for good (0: none)
      async_save=True,
  ))
  c.log_every = 1  # steps between metrics.jsonl / TensorBoard records
  # XLA options ('--name=value ...') for the train step when it runs on CPU.
  c.cpu_compiler_options = xla_options.DEFAULT_CPU_OPTIONS
  c.evals = ml_collections.ConfigDict(dict(
      every=0,  # steps between in-training evaluations; 0: only after the last step
      # Held-out loss on batches drawn like the training ones from this source
      # (kind '' = no held-out loss).
      heldout=sources.default_source_config(),
      heldout_batches=4,
      # exp(mean token cross-entropy) of the captioning decoder on those
      # held-out batches (needs model.decoder.weight > 0 and evals.heldout).
      caption_perplexity=False,
      # LocCa's referring-expression accuracy on those held-out batches: the
      # share of their ARef tasks whose greedily decoded box has IoU >= 0.5
      # with the true one, and the mean IoU (evaluate/referring.py; needs the
      # decoder's box tasks, model.decoder.box_weight > 0, and evals.heldout).
      box_accuracy=False,
      # Synthetic zero-shot and retrieval (synthetic training source, one host).
      zero_shot_examples=0,
  ))
  c.evals.heldout.kind = ''
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k=v,k2=v2' after the ':' of a config path, typed by `defaults`.

  A bare word `k` sets a boolean `k` to True. Unknown keys are errors.
  """
  clashes = [key for key in defaults if hasattr(ml_collections.ConfigDict, key)]
  if clashes:  # e.g. 'lock' would read back as ConfigDict.lock, a method
    raise ValueError(f'config arg names {clashes} clash with ConfigDict attributes')
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'config arg {key!r} is unknown; known: {sorted(defaults)}')
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f'config arg {key!r} needs a value')
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      parsed[key] = value
    else:
      parsed[key] = type(default)(value)
  return parsed


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` (local or gs://) by calling the file's get_config(arg)."""
  path, sep, arg = spec.partition('.py:')  # not at the ':' of gs://
  path += '.py' if sep else ''
  if not fs.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module = types.ModuleType('lit_navit_config')
  module.__file__ = path
  exec(compile(fs.read_text(path), path, 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """Sets each (dotted key, text) in `config` (`command_line.split_overrides`)."""
  for key, text in overrides:
    parent, leaf = _parent_of(config, key)
    value = _parse_value(key, text, parent.get_type(leaf), parent[leaf])
    with parent.unlocked():
      parent[leaf] = value


def _parent_of(config, key):
  """(the ConfigDict holding `key`, its last part); ValueError if unknown."""
  *groups, leaf = key.split('.')
  node = config
  for n, part in enumerate(groups):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f'--config.{key}: config key {".".join(groups[:n + 1])!r} '
                       'is unknown')
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ValueError(f'--config.{key}: config key {key!r} is unknown')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ValueError(f'--config.{key}: {key!r} is a group of keys; set one of '
                     f'{sorted(node[leaf].keys())}')
  return node, leaf


def _parse_value(key, text, kind, current):
  """`text` as a value of type `kind` (the key's type in the config)."""
  def bad(expected):
    return ValueError(f'--config.{key}={text!r}: expected {expected}')

  if current is None and text == 'None':  # a typed key left unset
    return None
  if kind is str:
    return text
  if kind is bool:
    if text.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
      raise bad('true or false')
    return text.lower() in ('true', '1', 'yes')
  if kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      raise bad(f'a number ({kind.__name__})') from None
  # literal_eval raises TypeError on '{[]: 1}' (an unhashable key), and
  # RecursionError or MemoryError on deep nesting.
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
    if kind is type(None):  # a key of no type (no default): take the text
      return text
    if current is None:  # unset, but typed (a placeholder): name the type
      raise bad(f'a Python literal ({kind.__name__})') from None
    raise bad(f'a Python literal like {current!r}') from None
  if kind in (list, tuple):
    if not isinstance(value, (list, tuple)):
      value = (value,)  # `--config.input.patch_sizes=16` means (16,)
    return kind(value)
  return value


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first key the schema lacks or mistypes."""
  _check_against(config, default_config(), prefix='')
  if config.batch_size <= 0:
    raise ValueError(f'config key batch_size must be positive, got {config.batch_size}')
  if config.total_steps < 1:
    raise ValueError(f'config key total_steps must be at least 1, got {config.total_steps}')
  if not config.optim.lr >= 0:  # NaN too
    raise ValueError(f'config key optim.lr must be >= 0, got {config.optim.lr}')
  sharding.check_mesh(config.mesh)
  decoder.check_config(config.model)
  two_towers.check_distill(config.model)
  _check_views(config)
  _check_box_tasks(config)
  if config.input.text_packing and not config.model.text.mask_padding:
    raise ValueError('input.text_packing=True cannot be combined with '
                     'model.text.mask_padding=False (the big_vision-exact tower '
                     'attends to padding, so it needs one caption a row)')
  xla_options.parse(config.cpu_compiler_options)


def _check_views(config) -> None:
  """The input views and the objectives that read them come together: a
  loss without its view has nothing to learn from, a view without its loss
  is compute spent for nothing."""
  distill, crops, mask_ratio = config.model.distill, config.input.local_crops, \
      config.input.mask_ratio
  pairs = ((distill.weight > 0, 'model.distill.weight',
            crops.count > 0, 'input.local_crops.count'),
           (distill.masked_weight > 0, 'model.distill.masked_weight',
            mask_ratio > 0, 'input.mask_ratio'))
  for loss_on, loss_key, view_on, view_key in pairs:
    if loss_on != view_on:
      on, off = (loss_key, view_key) if loss_on else (view_key, loss_key)
      raise ValueError(f'config key {on} is set but {off} is 0: set both '
                       '(self-distillation reads local crops, masked prediction '
                       'reads token masks) or neither')


def _check_box_tasks(config) -> None:
  """LocCa's box tasks: the pipeline's box sequences (input.box_tasks) and the
  decoder's loss on them (model.decoder.box_weight) come together, like the
  views of `_check_views`."""
  # input.box_tasks is the pipeline's key (data/pipeline.py).
  view_on = config.input.get('box_tasks', False)
  loss_on = config.model.decoder.box_weight > 0
  if view_on and not loss_on:
    raise ValueError('config key input.box_tasks=True needs model.decoder.box_weight '
                     '> 0 (and a decoder, model.decoder.weight > 0): without its '
                     'loss the box sequences are compute spent for nothing')
  if loss_on and not view_on:
    raise ValueError('config key model.decoder.box_weight > 0 needs input.box_tasks='
                     'True (a source with boxes): without the box sequences it has '
                     'nothing to learn from')


def check_paths(config: ml_collections.ConfigDict) -> None:
  """Raises FileNotFoundError naming the key and path of a file the config
  reads that does not exist (local or gs://), before anything is compiled.
  The data paths are checked as the source lists them."""
  for key, path in (('input.tokenizer', config.input.tokenizer),
                    ('init_from', config.init_from)):
    if not path or fs.exists(path):
      continue
    bucket = fs.missing_bucket(path)
    reason = f'bucket {bucket} does not exist' if bucket else 'does not exist'
    raise FileNotFoundError(f'config key {key}={path!r}: {reason}')


def _check_against(config, schema, prefix):
  for key in config.keys():
    name = prefix + key
    if key not in schema:
      raise ValueError(f'config key {name!r} is unknown')
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f'config key {name!r} must be a group of keys, got {value!r}')
      _check_against(value, default, name + '.')
    elif default is not None and value is not None and not _same_kind(value, default):
      raise ValueError(f'config key {name!r} has type {type(value).__name__}, '
                       f'expected {type(default).__name__}')


def _same_kind(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, (int, float)):
    return isinstance(value, (int, float))
  if isinstance(default, (list, tuple)):
    return isinstance(value, (list, tuple))
  return isinstance(value, type(default))
