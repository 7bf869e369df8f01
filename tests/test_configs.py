"""Every shipped config loads, passes the schema and builds its model and optimizer."""

import glob
import os
import sys

import jax
import pytest

from lit_navit import config as config_lib
from lit_navit import optim
from lit_navit import trainer as trainer_lib
from lit_navit.data import batch as batch_lib
from lit_navit.models import two_towers
from lit_navit.models import variants

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'configs')
SHIPPED = sorted(glob.glob(os.path.join(CONFIGS, '*.py')))


def _abstract_params(config):
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=config.input.tokens_per_row,
                             slots=config.input.images_per_row,
                             text_len=config.input.text_len,
                             patch_size=config.input.patch_sizes[0])
  return two_towers.param_shapes(config.model, spec)['params']


def test_every_config_file_is_covered():
  names = {os.path.basename(p) for p in SHIPPED}
  assert names == {'demo.py', 'siglip_navit.py', 'clip_navit.py', 'lit_navit.py',
                   'siglip2_navit.py'}


# spec: (total_steps, batch_size, image variant, text variant, loss, frozen towers)
BUILT = {
    'demo.py': (1200, 16, 'mu/8', 'mu', 'sigmoid', ()),
    'demo.py:steps=10,batch=8': (10, 8, 'mu/8', 'mu', 'sigmoid', ()),
    'siglip_navit.py': (100_000, 4096, 'B/16', 'B', 'sigmoid', ()),
    'siglip_navit.py:variant=S/16,text_variant=S,batch=1024':
        (100_000, 1024, 'S/16', 'S', 'sigmoid', ()),
    'clip_navit.py': (100_000, 4096, 'B/16', 'B', 'softmax', ()),
    'siglip2_navit.py:variant=S/16,text_variant=S,steps=1000':
        (1000, 4096, 'S/16', 'S', 'sigmoid', ()),
    'siglip2_navit.py:steps=1000,boxes': (1000, 4096, 'B/16', 'B', 'sigmoid', ()),
    'lit_navit.py:locked=img': (100_000, 4096, 'B/16', 'B', 'sigmoid', ('img',)),
    'lit_navit.py:locked=txt,variant=L/16': (100_000, 4096, 'L/16', 'B', 'sigmoid', ('txt',)),
}


@pytest.mark.parametrize('spec', sorted(BUILT))
def test_shipped_config_builds(spec):
  steps, batch, image, text, loss, frozen = BUILT[spec]
  config = config_lib.load_config_file(os.path.join(CONFIGS, spec))
  config_lib.check_config(config)
  # The args reached the config ...
  assert (config.total_steps, config.batch_size) == (steps, batch)
  assert (config.model.image.variant, config.model.text.variant) == (image, text)
  assert config.model.loss == loss
  assert config.input.patch_sizes == (int(image.split('/')[1]),)
  # ... and the towers built are of those sizes.
  params = _abstract_params(config)
  for tower, encoder, variant in (('img', 'Transformer', image), ('txt', 'Encoder_0', text)):
    width = variants.decode(variant)['width']
    assert params[tower][encoder]['encoder_norm']['scale'].shape == (width,), tower
  assert trainer_lib.frozen_towers(config.optim.schedule, params) == frozen
  tx, schedules = optim.make_optimizer(config.optim, params, config.total_steps)
  opt_state = jax.eval_shape(tx.init, params)
  assert len(schedules) == 1 and jax.tree.leaves(opt_state)


def test_recipes_follow_the_papers():
  siglip = config_lib.load_config_file(os.path.join(CONFIGS, 'siglip_navit.py'))
  assert siglip.model.loss == 'sigmoid' and siglip.input.tokens_per_row == 256
  assert (siglip.optim.lr, siglip.optim.wd, siglip.optim.grad_clip_norm) == (1e-3, 1e-4, 1.0)
  assert siglip.input.resolution.dist == 'truncated_normal'
  assert (siglip.input.resolution.min, siglip.input.resolution.max) == (64, 384)
  assert two_towers.param_count(_abstract_params(siglip)['img']) == pytest.approx(93.4e6, rel=0.01)
  clip = config_lib.load_config_file(os.path.join(CONFIGS, 'clip_navit.py'))
  assert clip.model.loss == 'softmax'
  # SigLIP 2: the decoder throughout, the teacher's objectives over the last
  # 20%, on siglip_navit's recipe.
  siglip2 = config_lib.load_config_file(os.path.join(CONFIGS, 'siglip2_navit.py') +
                                        ':steps=1000,crops=3')
  assert siglip2.model.decoder.weight > 0 and siglip2.model.distill.start_step == 800
  assert siglip2.model.distill.weight > 0 and siglip2.model.distill.masked_weight > 0
  assert (siglip2.input.local_crops.count, siglip2.input.mask_ratio) == (3, 0.5)
  assert siglip2.input.text_packing and siglip2.optim.lr == siglip.optim.lr


@pytest.mark.parametrize('lock', ['img', 'txt'])
def test_lit_locks_exactly_one_tower(lock):
  config = config_lib.load_config_file(os.path.join(CONFIGS, f'lit_navit.py:locked={lock}'))
  params = _abstract_params(config)
  assert trainer_lib.frozen_towers(config.optim.schedule, params) == (lock,)
  tx, _ = optim.make_optimizer(config.optim, params, config.total_steps)
  state_shapes = {leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(tx.init, params))}
  other = 'txt' if lock == 'img' else 'img'
  # Adam moments exist for the trainable tower's largest kernels only.
  locked_only = ({p.shape for p in jax.tree.leaves(params[lock])}
                 - {p.shape for p in jax.tree.leaves(params[other])})
  assert locked_only and not locked_only & state_shapes


@pytest.mark.parametrize('path', SHIPPED, ids=os.path.basename)
def test_loading_a_config_leaves_sys_path_alone(path):
  """A config's folder on sys.path would let configs/lit_navit.py shadow
  the lit_navit package in worker processes, which import it afresh."""
  before = list(sys.path)
  config_lib.load_config_file(path)
  assert sys.path == before


@pytest.mark.parametrize('loss_key, view_key', [
    ('model.distill.weight', 'input.local_crops.count'),
    ('model.distill.masked_weight', 'input.mask_ratio')])
def test_an_objective_and_its_view_come_together(loss_key, view_key):
  from lit_navit import config as config_lib  # pylint: disable=g-import-not-at-top
  value = {'model.distill.weight': 1.0, 'model.distill.masked_weight': 1.0,
           'input.local_crops.count': 1, 'input.mask_ratio': 0.5}
  for on, off in ((loss_key, view_key), (view_key, loss_key)):
    config = config_lib.default_config()
    config_lib.apply_overrides(config, [(on, str(value[on]))])
    with pytest.raises(ValueError, match=f'{on} is set but {off} is 0'):
      config_lib.check_config(config)
  config_lib.apply_overrides(config, [(off, str(value[off]))])
  config_lib.check_config(config)
