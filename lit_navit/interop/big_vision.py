"""big_vision two-tower checkpoints (.npz) <-> TwoTowers configs and params.

big_vision saves a model as one .npz whose keys are '/'-joined parameter
paths ('img/Transformer/encoderblock_0/LayerNorm_0/scale', 't', ...). Our
parameter names follow big_vision's, so the mapping is small:

  img/pos_embedding        <-> img/posemb/pos_embedding
  .../encoderblock_<i>/... <-> .../encoderblock/... stacked on axis 0, when
                               the checkpoint's and our config's `scan` differ
  txt/Encoder_0/pos_embedding (old checkpoints) is added to txt/pos_embedding

The image tower is big_vision's ViT (`models/vit.py`: conv stem, learned 1-D
posemb [1, G*G, W] or fixed sincos2d) or NaFlex ViT (`naflex_vit.py`: dense
stem, learned [G, G, W] grid), told apart by the stem kernel's rank. Sizes
are read from the arrays' shapes; what the arrays cannot tell (pooling
without a MAP head, a sincos posemb) comes from `Options`.

Released files (and big_vision's training checkpoints) put every name under
'params/' (or 'opt/target/'); that prefix is dropped on reading, as
big_vision's own `utils.load_params` does. Files are read with numpy alone
(allow_pickle=False): nothing is unpickled.
"""

import dataclasses
import math
import re
import zipfile

import jax
import ml_collections
import numpy as np

from lit_navit import fs
from lit_navit.models import two_towers
from lit_navit.models import variants

# Image towers big_vision can build from a checkpoint, by our stem.
IMAGE_MODELS = {'conv': 'vit', 'dense': 'proj.image_text.naflex_vit'}
TEXT_MODEL = 'proj.image_text.text_transformer'
# big_vision pool_type -> ours, per tower, where the checkpoint has no MAP head.
_IMAGE_POOLS = {'gap': 'mean', 'mean': 'mean', 'max': 'max'}
_TEXT_POOLS = {'last': 'last', 'first': 'first', 'gap': 'mean', 'mean': 'mean',
               'gmp': 'max', 'max': 'max'}
# Where big_vision checkpoints keep the model's params, most specific first.
PREFIXES = ('opt/target/', 'params/')
_BLOCK = re.compile(r'^(img/Transformer|txt/Encoder_0)/encoderblock(?:_(\d+))?/(.*)$')


class CheckpointMismatch(ValueError):
  """A big_vision checkpoint does not fit the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What a big_vision checkpoint's arrays do not say.

  Attributes:
    image_pool: big_vision image pool_type when there is no img/MAPHead_0
      ('gap', or 'max' for NaFlex; 'map' is read off the checkpoint).
    image_posemb: the ViT's posemb when there is no img/pos_embedding
      ('sincos2d'; a learned one is read off the checkpoint).
    text_pool: big_vision text pool_type when there is no txt/MAPHead_0
      ('last', 'first', 'gap', 'gmp').
    scan: our block layout (True: stacked, False: per layer); None keeps the
      checkpoint's.
    image_grid: (rows, cols) of a ViT's learned [1, rows*cols, W] posemb
      trained on non-square images; None: a square grid.
  """
  image_pool: str = 'gap'
  image_posemb: str = 'sincos2d'
  text_pool: str = 'last'
  scan: bool | None = None
  image_grid: tuple[int, int] | None = None


def _params_names(names) -> dict:
  """{name in the file: model name}: the names under a PREFIXES prefix when
  there is one (optimizer state and the like beside them are left out)."""
  for prefix in PREFIXES:
    if any(name.startswith(prefix) for name in names):
      return {name: name[len(prefix):] for name in names if name.startswith(prefix)}
  return {name: name for name in names}


def load_npz(path: str) -> dict:
  """{name: array} of a big_vision .npz, read without pickle."""
  try:
    with fs.open(path, 'rb') as f, np.load(f, allow_pickle=False) as npz:
      return {ours: np.asarray(npz[name])
              for name, ours in _params_names(npz.files).items()}
  except FileNotFoundError:
    raise
  except (ValueError, OSError) as e:
    raise CheckpointMismatch(f'{path}: not a readable .npz without pickle ({e})') from e


def load_shapes(path: str) -> dict:
  """{name: jax.ShapeDtypeStruct} of a .npz, from the array headers alone.

  Enough for `model_config`, without reading gigabytes of weights.
  """
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  shapes = {}
  try:
    with fs.open(path, 'rb') as f, zipfile.ZipFile(f) as archive:
      for info in archive.infolist():
        if not info.filename.endswith('.npy'):
          continue
        with archive.open(info) as f:
          version = np.lib.format.read_magic(f)
          if version not in readers:
            raise ValueError(f'.npy format version {version}')
          shape, _, dtype = readers[version](f)
        if dtype.hasobject:
          raise ValueError(f'{info.filename} holds Python objects (pickle)')
        shapes[info.filename[:-len('.npy')]] = jax.ShapeDtypeStruct(shape, dtype)
  except (zipfile.BadZipFile, ValueError) as e:
    raise CheckpointMismatch(f'{path}: not a readable .npz without pickle ({e})') from e
  return {ours: shapes[name] for name, ours in _params_names(shapes).items()}


def save_npz(path: str, arrays: dict) -> None:
  """Writes {name: array} as big_vision does (np.savez, one array a name)."""
  with fs.atomic_write(path) as f:
    np.savez(f, **{k: np.asarray(v) for k, v in sorted(arrays.items())})


def _get(arrays, name, ndim=None):
  if name not in arrays:
    raise CheckpointMismatch(f'checkpoint has no {name!r}')
  value = arrays[name]
  if ndim is not None and value.ndim != ndim:
    raise CheckpointMismatch(f'checkpoint {name!r} has shape {value.shape}, '
                             f'expected {ndim} dimensions')
  return value


def _tower_size(arrays, encoder: str) -> dict:
  """width, depth, mlp_dim, num_heads and layout of the encoder at `encoder`."""
  stacked = f'{encoder}/encoderblock/LayerNorm_0/scale'
  if stacked in arrays:
    depth, first, scan = arrays[stacked].shape[0], f'{encoder}/encoderblock', True
    layer_shape = lambda a: a.shape[1:]
  else:
    indices = {int(m.group(2)) for name in arrays
               if (m := _BLOCK.match(name)) and m.group(1) == encoder and m.group(2)}
    if not indices:
      raise CheckpointMismatch(f'checkpoint has no blocks under {encoder!r} '
                               '(neither encoderblock_<i> nor a stacked encoderblock)')
    depth, first, scan = max(indices) + 1, f'{encoder}/encoderblock_0', False
    if indices != set(range(depth)):
      raise CheckpointMismatch(f'checkpoint {encoder!r} has blocks {sorted(indices)}, '
                               f'expected 0..{depth - 1}')
    layer_shape = lambda a: a.shape
  query = layer_shape(_get(arrays, f'{first}/MultiHeadDotProductAttention_0/query/kernel'))
  mlp = layer_shape(_get(arrays, f'{first}/MlpBlock_0/Dense_0/kernel'))
  if len(query) != 3:
    raise CheckpointMismatch(f'checkpoint {first}/MultiHeadDotProductAttention_0/'
                             f'query/kernel has layer shape {query}, expected '
                             '[width, heads, head_dim]')
  return dict(width=int(query[0]), depth=int(depth),
              mlp_dim=int(mlp[-1]), num_heads=int(query[1])), scan


def _square_side(n: int, name: str, shape) -> int:
  side = math.isqrt(n)
  if side * side != n:
    raise CheckpointMismatch(f'checkpoint {name!r} of shape {shape} is not a '
                             'square grid of positions')
  return side


def _pool(value: str, table: dict, what: str) -> str:
  if value not in table:
    raise ValueError(f'{what} {value!r} is not supported; expected one of '
                     f'{sorted(table)} (or a MAP head in the checkpoint)')
  return table[value]


def _set_grid(c, grid) -> None:
  rows, cols = int(grid[0]), int(grid[1])
  c.max_grid = max(rows, cols)
  if rows != cols:
    c.posemb_grid = (rows, cols)


def _image_config(arrays, options: Options, c) -> int | None:
  """Fills image config `c` from img/...; returns the head's output width."""
  for unsupported in ('img/cls', 'img/pre_logits/kernel', 'img/patchln_pre/scale',
                      'img/patchln_post/scale'):
    if unsupported in arrays:
      raise CheckpointMismatch(f'checkpoint has {unsupported!r}: that image '
                               'tower option has no counterpart here')
  kernel = _get(arrays, 'img/embedding/kernel')
  if kernel.ndim == 4 and kernel.shape[0] == kernel.shape[1] and kernel.shape[2] == 3:
    c.stem, patch = 'conv', kernel.shape[0]
  elif kernel.ndim == 2 and (patch := math.isqrt(kernel.shape[0] // 3)) ** 2 * 3 == kernel.shape[0]:
    c.stem = 'dense'
  else:
    raise CheckpointMismatch(f"checkpoint 'img/embedding/kernel' has shape "
                             f'{kernel.shape}, expected [p, p, 3, W] or [p*p*3, W]')
  size, scan = _tower_size(arrays, 'img/Transformer')
  c.update(size)
  c.variant = ''
  c.base_patch_size = int(patch)
  c.scan = scan if options.scan is None else options.scan
  posemb = arrays.get('img/pos_embedding')
  if posemb is None:
    if c.stem == 'dense':
      raise CheckpointMismatch("NaFlex checkpoint has no 'img/pos_embedding'")
    if options.image_posemb != 'sincos2d':
      raise ValueError(f'image_posemb {options.image_posemb!r}: a ViT without '
                       "'img/pos_embedding' can only be 'sincos2d'")
    c.posemb = 'sincos2d'
  elif posemb.ndim == 3 and posemb.shape[0] == 1:
    c.posemb = 'learn_1d_resized'
    if options.image_grid is None:
      side = _square_side(posemb.shape[1], 'img/pos_embedding', posemb.shape)
      _set_grid(c, (side, side))
    elif math.prod(options.image_grid) != posemb.shape[1]:
      raise CheckpointMismatch(f"checkpoint 'img/pos_embedding' has shape "
                               f'{posemb.shape}, image_grid {options.image_grid} '
                               f'needs [1, {math.prod(options.image_grid)}, W]')
    else:
      _set_grid(c, options.image_grid)
  elif posemb.ndim == 3:
    c.posemb = 'learn_2d_resized'
    _set_grid(c, posemb.shape[:2])
  else:
    raise CheckpointMismatch(f"checkpoint 'img/pos_embedding' has shape "
                             f'{posemb.shape}, expected [1, G*G, W] or [G, G, W]')
  if 'img/MAPHead_0/probe' in arrays:
    c.pool = 'map'
  else:
    c.pool = _pool(options.image_pool, _IMAGE_POOLS, 'image_pool')
  head = arrays.get('img/head/kernel')
  c.head = head is not None
  return None if head is None else int(head.shape[-1])


def _text_config(arrays, options: Options, c) -> int | None:
  """Fills text config `c` from txt/...; returns the head's output width."""
  embedding = _get(arrays, 'txt/Embed_0/embedding', ndim=2)
  posemb = _get(arrays, 'txt/pos_embedding', ndim=3)
  size, scan = _tower_size(arrays, 'txt/Encoder_0')
  c.update(size)
  c.variant = ''
  c.vocab_size = int(embedding.shape[0])
  c.max_len = int(posemb.shape[1])
  c.scan = scan if options.scan is None else options.scan
  c.mask_padding = False  # big_vision's text tower: see models/text.py.
  c.causal = False
  if 'txt/MAPHead_0/probe' in arrays:
    c.pool = 'map'
  else:
    c.pool = _pool(options.text_pool, _TEXT_POOLS, 'text_pool')
  head = arrays.get('txt/head/kernel')
  c.head = head is not None
  return None if head is None else int(head.shape[-1])


def model_config(arrays: dict, options: Options = Options()) -> ml_collections.ConfigDict:
  """The TwoTowers config (models/two_towers.default_config) of a checkpoint."""
  c = two_towers.default_config()
  img_out = _image_config(arrays, options, c.image)
  txt_out = _text_config(arrays, options, c.text)
  img_dim = img_out or c.image.width
  txt_dim = txt_out or c.text.width
  if img_dim != txt_dim:
    raise CheckpointMismatch(f'checkpoint image embeddings have width {img_dim} '
                             f'but text embeddings {txt_dim}')
  c.embed_dim = img_dim
  c.loss = 'sigmoid' if 'b' in arrays else 'softmax'
  c.dtype = 'float32'
  return c


def image_batch(image, patch_size: int | None = None) -> dict:
  """big_vision image-model inputs as the image keys of a packed batch, one
  image a row (slot 1), for the image tower's own apply.

  Args:
    image: a ViT's float images [N, H, W, 3] (cut into row-major patches of
      `patch_size`, flattened (py, px, c)), or NaFlex's tuple
      (patches [N, L, p*p*3], ptype [N, L], yabs [N, L], xabs [N, L]), whose
      grid is (max yabs + 1, max xabs + 1) as NaFlex takes it.
    patch_size: the ViT's patch size (images only).
  """
  if isinstance(image, (tuple, list)):
    patches, ptype, yabs, xabs = (np.asarray(x) for x in image)
    real = ptype == 1
    grid = np.stack([np.where(real, yabs, 0).max(1), np.where(real, xabs, 0).max(1)], -1) + 1
    return {'image/patches': patches.astype(np.float32),
            'image/yx': np.stack([yabs, xabs], -1).astype(np.int32),
            'image/segment': real.astype(np.int32),
            'image/grid': grid[:, None].astype(np.int32)}
  images = np.asarray(image, np.float32)
  n, height, width, _ = images.shape
  p = patch_size
  if not p or height % p or width % p:
    raise ValueError(f'images {images.shape} are not whole patches of {p}')
  rows, cols = height // p, width // p
  patches = images.reshape(n, rows, p, cols, p, 3).transpose(0, 1, 3, 2, 4, 5)
  yy, xx = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
  return {'image/patches': patches.reshape(n, rows * cols, p * p * 3),
          'image/yx': np.broadcast_to(np.stack([yy, xx], -1), (n, rows * cols, 2)).copy(),
          'image/segment': np.ones((n, rows * cols), np.int32),
          'image/grid': np.full((n, 1, 2), (rows, cols), np.int32)}


def encode(config, params, image=None, text=None):
  """What big_vision's two_towers Model.apply returns, from our model.

  Args:
    config: the model config (`model_config`); params: its params.
    image: big_vision image inputs (see `image_batch`), or None.
    text: int tokens [N, T], or None.

  Returns:
    (zimg, ztxt, out): L2-normalised float32 embeddings (None where the
    input is None) and out = {'t': exp(t), 'b': b (sigmoid models)}.
  """
  model = two_towers.TwoTowers(config)
  variables = {'params': params}
  zimg = ztxt = None
  if image is not None:
    batch = image_batch(image, two_towers.base_patch_size(config.image))
    zimg = np.asarray(model.apply(variables, batch, method=model.embed_images))
  if text is not None:
    ztxt = np.asarray(model.apply(variables, np.asarray(text, np.int32),
                                  method=model.embed_texts))
  out = {'t': np.exp(np.asarray(params['t']))}
  if 'b' in params:
    out['b'] = np.asarray(params['b'])
  return zimg, ztxt, out


def adopt_tower(config, npz: str, tower: str) -> None:
  """Makes training `config`'s `tower` ('img' or 'txt') the one stored in `npz`.

  For LiT from a big_vision checkpoint: the tower's model config is read off
  the file's array headers, embed_dim becomes its output width, and the
  input's patch size (img) or caption length (txt) follow it. The other
  tower keeps its config and gets a head to embed_dim.
  """
  imported = model_config(load_shapes(npz))
  if tower == 'img':
    config.model.image = imported.image
    config.input.patch_sizes = (imported.image.base_patch_size,)
  elif tower == 'txt':
    config.model.text = imported.text
    config.input.text_len = imported.text.max_len
  else:
    raise ValueError(f'tower {tower!r}: expected img or txt')
  config.model.embed_dim = imported.embed_dim


def _paths(tree) -> dict:
  return {jax.tree_util.keystr(k, simple=True, separator='/'): v
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _relayout(arrays: dict, scan_of: dict) -> dict:
  """Stacks or unstacks encoder blocks so each encoder's layout is scan_of[encoder]."""
  out, per_layer = {}, {}
  for name, value in arrays.items():
    m = _BLOCK.match(name)
    if not m or m.group(1) not in scan_of:
      out[name] = value
      continue
    encoder, index, rest = m.groups()
    if index is None and not scan_of[encoder]:
      for i, layer in enumerate(value):
        out[f'{encoder}/encoderblock_{i}/{rest}'] = layer
    elif index is not None and scan_of[encoder]:
      per_layer.setdefault((encoder, rest), {})[int(index)] = value
    else:
      out[name] = value
  for (encoder, rest), layers in per_layer.items():
    out[f'{encoder}/encoderblock/{rest}'] = np.stack(
        [layers[i] for i in sorted(layers)])
  return out


def to_ours(arrays: dict, config) -> dict:
  """{our param path: array} of a checkpoint, laid out for model `config`.

  Only renames and restacks; `to_params` checks the result against the model.
  """
  arrays = dict(arrays)
  old = arrays.pop('txt/Encoder_0/pos_embedding', None)
  if old is not None and 'txt/pos_embedding' in arrays:
    arrays['txt/pos_embedding'] = arrays['txt/pos_embedding'] + old
  if 'img/pos_embedding' in arrays:
    arrays['img/posemb/pos_embedding'] = arrays.pop('img/pos_embedding')
  return _relayout(arrays, {'img/Transformer': config.image.scan,
                            'txt/Encoder_0': config.text.scan})


def to_params(arrays: dict, config) -> dict:
  """The TwoTowers(config) params of a checkpoint, every one checked.

  Raises CheckpointMismatch naming each parameter that is missing, has
  another shape (both shapes given) or that the model lacks.
  """
  ours = to_ours(arrays, config)
  expected = _paths(two_towers.param_shapes(config)['params'])
  problems = []
  for path, want in expected.items():
    if path not in ours:
      problems.append(f'missing {path!r} (model expects {tuple(want.shape)})')
    elif ours[path].shape != want.shape:
      problems.append(f'{path!r}: checkpoint has {tuple(ours[path].shape)}, '
                      f'model expects {tuple(want.shape)}')
  problems += [f'unexpected {path!r} {tuple(ours[path].shape)} (not in the model)'
               for path in sorted(set(ours) - set(expected))]
  if problems:
    raise CheckpointMismatch('big_vision checkpoint does not match the model: '
                             + '; '.join(problems))
  flat = {path: np.asarray(ours[path], expected[path].dtype) for path in expected}
  return _unflatten(flat)


def _unflatten(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _check_exportable(config) -> None:
  img, txt = config.image, config.text
  problems = []
  if img.get('stem', 'conv') == 'dense' and img.posemb not in (
      'learn_2d_resized', 'learn_1d_resized'):
    problems.append(f'image.posemb {img.posemb!r} (NaFlex has a learned 2-D grid)')
  if img.get('stem', 'conv') == 'conv' and img.posemb not in (
      'learn_2d_resized', 'learn_1d_resized', 'sincos2d'):
    problems.append(f'image.posemb {img.posemb!r} (ViT has a learned or sincos2d posemb)')
  rows, cols = two_towers.posemb_grid(img)
  if img.get('stem', 'conv') == 'dense' and rows != cols:
    problems.append(f'image.posemb_grid {(rows, cols)} (NaFlex grids are square)')
  if img.get('stem', 'conv') == 'conv' and img.pool == 'max':
    problems.append("image.pool 'max' (ViT pools map, gap, tok or 0)")
  problems += layer_refusals(config)
  if problems:
    raise ValueError('big_vision has no counterpart for ' + ', '.join(problems))


def layer_refusals(config) -> list[str]:
  """The layer options that neither big_vision nor transformers has."""
  problems = []
  for tower, c in (('image', config.image), ('text', config.text)):
    if c.qk_norm:
      problems.append(f'{tower}.qk_norm')
    if not c.use_bias:
      problems.append(f'{tower}.use_bias=False')
  if config.text.causal:
    problems.append('text.causal')
  return problems


def from_params(params, config, scan: bool | None = None) -> dict:
  """big_vision {name: array} of TwoTowers(config) params.

  Params of SigLIP 2's training objectives (decoder, distillation heads,
  mask token) are not exported: big_vision's SigLIP has none of them.
  `scan` picks the block layout of the file (None: the config's). The
  learned posemb takes big_vision's shape for the image model the stem
  implies: [1, G*G, W] for ViT, [G, G, W] for NaFlex.
  """
  _check_exportable(config)
  arrays = {k: np.asarray(v)
            for k, v in _paths(two_towers.without_training_only(params)).items()}
  posemb = arrays.pop('img/posemb/pos_embedding', None)
  if posemb is not None:
    width = posemb.shape[-1]
    rows, cols = two_towers.posemb_grid(config.image)
    if config.image.get('stem', 'conv') == 'conv':
      posemb = posemb.reshape(1, rows * cols, width)
    else:
      posemb = posemb.reshape(rows, cols, width)
    arrays['img/pos_embedding'] = posemb
  if scan is not None:
    arrays = _relayout(arrays, {'img/Transformer': scan, 'txt/Encoder_0': scan})
  return arrays


def bv_model_config(config) -> dict:
  """big_vision two_towers `model_cfg` that builds the model `from_params` writes."""
  img, txt = config.image, config.text
  img_size = {k: int(v) for k, v in variants.tower_size(img, 'image').items()}
  txt_size = {k: int(v) for k, v in variants.tower_size(txt, 'text').items()}
  stem = img.get('stem', 'conv')
  image = dict(**img_size, pool_type={'map': 'map', 'mean': 'gap', 'max': 'max'}[img.pool],
               scan=bool(img.scan))
  if stem == 'conv':
    patch = two_towers.base_patch_size(img)
    image.update(patch_size=[patch, patch],
                 posemb='sincos2d' if img.posemb == 'sincos2d' else 'learn')
  else:
    image.update(posemb='learn_2d', nposemb=int(img.max_grid))
  pools = {'last': 'last', 'first': 'first', 'mean': 'gap', 'max': 'gmp', 'map': 'map'}
  text = dict(**txt_size, vocab_size=int(txt.vocab_size), pool_type=pools[txt.pool],
              scan=bool(txt.scan))
  out_dim = [int(config.embed_dim) if img.get('head', True) else None,
             int(config.embed_dim) if txt.get('head', True) else None]
  cfg = dict(image_model=IMAGE_MODELS[stem], text_model=TEXT_MODEL,
             image=image, text=text, out_dim=out_dim)
  if config.loss == 'sigmoid':
    cfg['bias_init'] = -10.0
  return cfg

