"""transformers' SiglipModel / Siglip2Model <-> big_vision's per-layer names.

Our params are named as big_vision's (interop/big_vision.py maps those to
ours and checks them), so this module only renames and transposes between
big_vision's per-layer arrays and a transformers state dict:

  img/embedding/kernel  [p,p,3,W] conv (SigLIP)   <-> patch_embedding.weight [W,3,p,p]
                        [p*p*3,W] dense (NaFlex)  <-> patch_embedding.weight [W,p*p*3]
  img/pos_embedding     [1,G*G,W] / [G,G,W]       <-> position_embedding.weight [G*G,W]
  Dense kernels [in, out]                         <-> Linear weights [out, in]
  attention query/key/value [W, H, D]             <-> q/k/v_proj [H*D, W]
  the MAP head's query/key/value                  <-> one in_proj_weight [3W, W]
  t, b                                            <-> logit_scale, logit_bias

transformers' SigLIP has a MAP-pooled image tower without a projection, a
text tower that attends to padding and pools the last position into a
linear head, tanh-GELU and LayerNorm eps 1e-6: models that differ are
refused, naming the option. Only numpy here; the CLIs read and write
safetensors with its numpy API, so lit_navit gains no torch dependency.
"""

import re

import numpy as np

from lit_navit.interop import big_vision
from lit_navit.models import two_towers
from lit_navit.models import variants

ARCHITECTURES = {'siglip': 'SiglipModel', 'siglip2': 'Siglip2Model'}
# transformers' names of the tanh approximation of GELU, which flax's nn.gelu is.
TANH_GELU = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast')
LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's, and SigLIP's.

_TOWERS = {'img': ('vision_model', 'img/Transformer', 'post_layernorm'),
           'txt': ('text_model', 'txt/Encoder_0', 'final_layer_norm')}
_NORMS = {'LayerNorm_0': 'layer_norm1', 'LayerNorm_1': 'layer_norm2'}
_ATTENTION = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj', 'out': 'out_proj'}
_MLP = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}


class Unsupported(ValueError):
  """A model or folder that the other side cannot represent."""


def model_type(model_config) -> str:
  """'siglip2' for a NaFlex (dense stem) image tower, else 'siglip'."""
  return 'siglip2' if model_config.image.get('stem', 'conv') == 'dense' else 'siglip'


def check_exportable(model_config) -> None:
  """Raises Unsupported naming every option transformers' SigLIP lacks."""
  img, txt = model_config.image, model_config.text
  problems = []
  if img.pool != 'map':
    problems.append(f"image.pool {img.pool!r} (transformers pools with a MAP head)")
  if img.get('head', True):
    problems.append('image.head=True (transformers has no image projection)')
  if img.posemb not in ('learn_1d_resized', 'learn_2d_resized'):
    problems.append(f'image.posemb {img.posemb!r} (transformers has one learned grid)')
  rows, cols = two_towers.posemb_grid(img)
  if rows != cols:
    problems.append(f'image.posemb_grid {(rows, cols)} (transformers grids are square)')
  if txt.pool != 'last':
    problems.append(f"text.pool {txt.pool!r} (transformers pools the last position)")
  if not txt.get('head', True):
    problems.append('text.head=False (transformers always projects the text)')
  problems += big_vision.layer_refusals(model_config)
  if problems:
    raise Unsupported('transformers has no counterpart for ' + ', '.join(problems))


def hf_config(model_config, *, pad_id: int, eos_id: int) -> dict:
  """config.json of the transformers model that `to_hf`'s state dict fits."""
  kind = model_type(model_config)
  img, txt = model_config.image, model_config.text
  common = dict(hidden_act='gelu_pytorch_tanh', layer_norm_eps=LAYER_NORM_EPS,
                attention_dropout=0.0)

  def sizes(c, tower):
    size = variants.tower_size(c, tower)
    return dict(hidden_size=int(size['width']), intermediate_size=int(size['mlp_dim']),
                num_hidden_layers=int(size['depth']),
                num_attention_heads=int(size['num_heads']))

  patch = two_towers.base_patch_size(img)
  grid = int(two_towers.posemb_grid(img)[0])
  vision = dict(**sizes(img, 'image'), **common, num_channels=3, patch_size=int(patch),
                vision_use_head=True)
  if kind == 'siglip2':
    vision['num_patches'] = grid * grid
  else:
    vision['image_size'] = grid * int(patch)
  text = dict(**sizes(txt, 'text'), **common, vocab_size=int(txt.vocab_size),
              max_position_embeddings=int(txt.max_len),
              projection_size=int(model_config.embed_dim),
              pad_token_id=int(pad_id), eos_token_id=int(eos_id), bos_token_id=None)
  return dict(architectures=[ARCHITECTURES[kind]], model_type=kind,
              text_config=dict(text, model_type=f'{kind}_text_model'),
              vision_config=dict(vision, model_type=f'{kind}_vision_model'),
              dtype='float32')


def _dense_to_hf(out, prefix, arrays, name):
  out[f'{prefix}.weight'] = arrays[f'{name}/kernel'].T
  out[f'{prefix}.bias'] = arrays[f'{name}/bias']


def _norm_to_hf(out, prefix, arrays, name):
  out[f'{prefix}.weight'] = arrays[f'{name}/scale']
  out[f'{prefix}.bias'] = arrays[f'{name}/bias']


def _attention_to_hf(out, prefix, arrays, name):
  for ours, theirs in _ATTENTION.items():
    kernel, bias = arrays[f'{name}/{ours}/kernel'], arrays[f'{name}/{ours}/bias']
    if ours == 'out':  # [H, D, W] -> [W, H*D]
      out[f'{prefix}.{theirs}.weight'] = kernel.reshape(-1, kernel.shape[-1]).T
      out[f'{prefix}.{theirs}.bias'] = bias
    else:  # [W, H, D] -> [H*D, W]
      out[f'{prefix}.{theirs}.weight'] = kernel.reshape(kernel.shape[0], -1).T
      out[f'{prefix}.{theirs}.bias'] = bias.reshape(-1)


def _mlp_to_hf(out, prefix, arrays, name):
  for ours, theirs in _MLP.items():
    _dense_to_hf(out, f'{prefix}.{theirs}', arrays, f'{name}/{ours}')


def to_hf(arrays: dict, model_config) -> dict:
  """A transformers state dict {name: float32 array} of big_vision per-layer
  `arrays` (big_vision.from_params(..., scan=False)) of `model_config`."""
  check_exportable(model_config)
  out = {}
  for tower, (hf_tower, encoder, final_norm) in _TOWERS.items():
    depth = variants.tower_size(model_config.image if tower == 'img' else model_config.text,
                                'image' if tower == 'img' else 'text')['depth']
    for i in range(depth):
      block, layer = f'{encoder}/encoderblock_{i}', f'{hf_tower}.encoder.layers.{i}'
      for ours, theirs in _NORMS.items():
        _norm_to_hf(out, f'{layer}.{theirs}', arrays, f'{block}/{ours}')
      _attention_to_hf(out, f'{layer}.self_attn', arrays,
                       f'{block}/MultiHeadDotProductAttention_0')
      _mlp_to_hf(out, f'{layer}.mlp', arrays, f'{block}/MlpBlock_0')
    _norm_to_hf(out, f'{hf_tower}.{final_norm}', arrays, f'{encoder}/encoder_norm')

  kernel = arrays['img/embedding/kernel']
  embed = 'vision_model.embeddings'
  out[f'{embed}.patch_embedding.weight'] = (kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4
                                            else kernel.T)
  out[f'{embed}.patch_embedding.bias'] = arrays['img/embedding/bias']
  posemb = arrays['img/pos_embedding']
  out[f'{embed}.position_embedding.weight'] = posemb.reshape(-1, posemb.shape[-1])
  head = 'vision_model.head'
  out[f'{head}.probe'] = arrays['img/MAPHead_0/probe']
  attention = 'img/MAPHead_0/MultiHeadDotProductAttention_0'
  qkv = [arrays[f'{attention}/{n}/kernel'] for n in ('query', 'key', 'value')]
  out[f'{head}.attention.in_proj_weight'] = np.concatenate(
      [k.reshape(k.shape[0], -1).T for k in qkv])
  out[f'{head}.attention.in_proj_bias'] = np.concatenate(
      [arrays[f'{attention}/{n}/bias'].reshape(-1) for n in ('query', 'key', 'value')])
  out_kernel = arrays[f'{attention}/out/kernel']
  out[f'{head}.attention.out_proj.weight'] = out_kernel.reshape(-1, out_kernel.shape[-1]).T
  out[f'{head}.attention.out_proj.bias'] = arrays[f'{attention}/out/bias']
  _norm_to_hf(out, f'{head}.layernorm', arrays, 'img/MAPHead_0/LayerNorm_0')
  _mlp_to_hf(out, f'{head}.mlp', arrays, 'img/MAPHead_0/MlpBlock_0')

  out['text_model.embeddings.token_embedding.weight'] = arrays['txt/Embed_0/embedding']
  out['text_model.embeddings.position_embedding.weight'] = arrays['txt/pos_embedding'][0]
  _dense_to_hf(out, 'text_model.head', arrays, 'txt/head')
  out['logit_scale'] = arrays['t'].reshape(1)
  # A softmax-loss (CLIP) model has no bias: 0 gives its logits t * cos.
  out['logit_bias'] = arrays.get('b', np.zeros(1, np.float32)).reshape(1)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


class _Tracked(dict):
  """A state dict that remembers which tensors were read."""

  def __init__(self, *args):
    super().__init__(*args)
    self.read = set()

  def __getitem__(self, name):
    self.read.add(name)
    return super().__getitem__(name)


# Buffers older transformers versions saved; not weights.
_IGNORED = re.compile(r'.*\.position_ids$')


def _get(state, name):
  if name not in state:
    raise big_vision.CheckpointMismatch(f'transformers checkpoint has no {name!r}')
  return state[name]


def check_importable(config: dict) -> str:
  """The model type ('siglip' or 'siglip2') of config.json, or Unsupported."""
  kind = config.get('model_type')
  if kind not in ARCHITECTURES:
    raise Unsupported(f'config.json model_type {kind!r}: expected one of '
                      f'{sorted(ARCHITECTURES)} (SiglipModel or Siglip2Model)')
  for tower in ('text_config', 'vision_config'):
    c = config.get(tower) or {}
    if c.get('hidden_act', 'gelu_pytorch_tanh') not in TANH_GELU:
      raise Unsupported(f'{tower}.hidden_act {c["hidden_act"]!r}: only the tanh '
                        f'GELU ({", ".join(TANH_GELU)}) is supported')
    if not np.isclose(c.get('layer_norm_eps', LAYER_NORM_EPS), LAYER_NORM_EPS):
      raise Unsupported(f'{tower}.layer_norm_eps {c["layer_norm_eps"]}: only '
                        f'{LAYER_NORM_EPS} is supported')
  if not (config.get('vision_config') or {}).get('vision_use_head', True):
    raise Unsupported('vision_config.vision_use_head=false: a tower without '
                      'its MAP head has no image embedding')
  return kind


def _layers(state, prefix):
  found = {int(m.group(1)) for name in state
           if (m := re.match(re.escape(prefix) + r'\.encoder\.layers\.(\d+)\.', name))}
  if found != set(range(len(found))):
    raise big_vision.CheckpointMismatch(f'transformers checkpoint {prefix} has layers '
                                        f'{sorted(found)}')
  return len(found)


def _dense_from_hf(out, name, state, prefix):
  out[f'{name}/kernel'] = _get(state, f'{prefix}.weight').T
  out[f'{name}/bias'] = _get(state, f'{prefix}.bias')


def _norm_from_hf(out, name, state, prefix):
  out[f'{name}/scale'] = _get(state, f'{prefix}.weight')
  out[f'{name}/bias'] = _get(state, f'{prefix}.bias')


def from_hf(state: dict, config: dict) -> dict:
  """big_vision per-layer arrays of a transformers SigLIP state dict, for
  big_vision.model_config / to_params (which check every shape)."""
  kind = check_importable(config)
  state = _Tracked({k: np.asarray(v, np.float32) for k, v in state.items()})
  out = {}
  for tower, (hf_tower, encoder, final_norm) in _TOWERS.items():
    heads = int(config[f'{"vision" if tower == "img" else "text"}_config']
                .get('num_attention_heads', 12))
    for i in range(_layers(state, hf_tower)):
      block, layer = f'{encoder}/encoderblock_{i}', f'{hf_tower}.encoder.layers.{i}'
      for ours, theirs in _NORMS.items():
        _norm_from_hf(out, f'{block}/{ours}', state, f'{layer}.{theirs}')
      attention = f'{block}/MultiHeadDotProductAttention_0'
      for ours, theirs in _ATTENTION.items():
        weight = _get(state, f'{layer}.self_attn.{theirs}.weight')
        bias = _get(state, f'{layer}.self_attn.{theirs}.bias')
        width = weight.shape[0]
        if ours == 'out':
          out[f'{attention}/out/kernel'] = weight.T.reshape(heads, -1, width)
          out[f'{attention}/out/bias'] = bias
        else:
          out[f'{attention}/{ours}/kernel'] = weight.T.reshape(weight.shape[1], heads, -1)
          out[f'{attention}/{ours}/bias'] = bias.reshape(heads, -1)
      for ours, theirs in _MLP.items():
        _dense_from_hf(out, f'{block}/MlpBlock_0/{ours}', state, f'{layer}.mlp.{theirs}')
    _norm_from_hf(out, f'{encoder}/encoder_norm', state, f'{hf_tower}.{final_norm}')

  embed = 'vision_model.embeddings'
  weight = _get(state, f'{embed}.patch_embedding.weight')
  out['img/embedding/kernel'] = (weight.T if kind == 'siglip2'
                                 else weight.transpose(2, 3, 1, 0))
  out['img/embedding/bias'] = _get(state, f'{embed}.patch_embedding.bias')
  posemb = _get(state, f'{embed}.position_embedding.weight')
  if kind == 'siglip2':
    side = int(round(posemb.shape[0] ** 0.5))
    out['img/pos_embedding'] = posemb.reshape(side, -1, posemb.shape[-1])
  else:
    out['img/pos_embedding'] = posemb[None]
  head = 'vision_model.head'
  out['img/MAPHead_0/probe'] = _get(state, f'{head}.probe')
  heads = int(config['vision_config'].get('num_attention_heads', 12))
  attention = 'img/MAPHead_0/MultiHeadDotProductAttention_0'
  in_weight = _get(state, f'{head}.attention.in_proj_weight')
  in_bias = _get(state, f'{head}.attention.in_proj_bias')
  width = in_weight.shape[1]
  for i, name in enumerate(('query', 'key', 'value')):
    out[f'{attention}/{name}/kernel'] = in_weight[i * width:(i + 1) * width].T.reshape(
        width, heads, -1)
    out[f'{attention}/{name}/bias'] = in_bias[i * width:(i + 1) * width].reshape(heads, -1)
  out_weight = _get(state, f'{head}.attention.out_proj.weight')
  out[f'{attention}/out/kernel'] = out_weight.T.reshape(heads, -1, out_weight.shape[0])
  out[f'{attention}/out/bias'] = _get(state, f'{head}.attention.out_proj.bias')
  _norm_from_hf(out, 'img/MAPHead_0/LayerNorm_0', state, f'{head}.layernorm')
  for ours, theirs in _MLP.items():
    _dense_from_hf(out, f'img/MAPHead_0/MlpBlock_0/{ours}', state, f'{head}.mlp.{theirs}')

  out['txt/Embed_0/embedding'] = _get(state, 'text_model.embeddings.token_embedding.weight')
  out['txt/pos_embedding'] = _get(state, 'text_model.embeddings.position_embedding.weight')[None]
  _dense_from_hf(out, 'txt/head', state, 'text_model.head')
  out['t'] = _get(state, 'logit_scale').reshape(1)
  out['b'] = _get(state, 'logit_bias').reshape(1)
  unread = sorted(k for k in set(state) - state.read if not _IGNORED.match(k))
  if unread:
    raise big_vision.CheckpointMismatch(
        f'transformers checkpoint has tensors a {ARCHITECTURES[kind]} lacks: '
        + ', '.join(unread[:5]) + (f' and {len(unread) - 5} more' if len(unread) > 5 else ''))
  return out
