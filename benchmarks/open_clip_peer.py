"""open_clip's train step on PEER_BASELINES' W1 or W2, as an interleave worker.

The model is open_clip's own SigLIP two-tower (its `ViT-B-16-SigLIP` config:
timm ViT with MAP pooling, open_clip's text transformer, 64 tokens, vocab
32000, last-token pooling, embedding 768); W2 swaps in timm's S/16 trunk
with the same SigLIP settings (no class token, MAP pooling, a linear head
to 768) and a text tower of width 384 with 6 heads. The step is open_clip's
SigLipLoss on the model's features, backward, and torch's Adam, on random
pixels and tokens, float32 on the CPU. Needs the `bench` extra.

  python benchmarks/open_clip_peer.py w1 --warmup 2   # then JSON on stdin
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # pylint: disable=wrong-import-position

# W1 / W2: (timm trunk, text width, text heads, batch), PEER_BASELINES.md.
WORKLOADS = {'w1': ('vit_base_patch16_224', 768, 12, 8),
             'w2': ('vit_small_patch16_224', 384, 6, 32)}


def import_open_clip():
  """open_clip, importable beside the CPU build of torch.

  PyPI's torchvision is built against the CUDA build of torch: beside the
  CPU build its operator library does not load, and torchvision then fails
  at import while registering fake kernels for two of those operators (nms,
  qnms). open_clip needs torchvision only for its image transforms, which
  this benchmark does not use, so the two operators' schemas are declared
  first when they are missing; nothing calls them.
  """
  import torch  # pylint: disable=import-outside-toplevel
  try:
    import open_clip  # pylint: disable=import-outside-toplevel
    return open_clip
  except RuntimeError as error:
    if 'torchvision::' not in str(error):
      raise
  for name in [m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm', 'open_clip')]:
    del sys.modules[name]
  library = torch.library.Library('torchvision', 'DEF')  # pylint: disable=no-member
  for op in ('nms', 'qnms'):
    if not hasattr(torch.ops.torchvision, op):
      library.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  import open_clip  # pylint: disable=import-outside-toplevel,redefined-outer-name
  import_open_clip.library = library  # Keeps the declarations alive.
  return open_clip


def build_model(open_clip, workload: str):
  """open_clip's SigLIP two-tower at W1's or W2's sizes, randomly initialised."""
  import timm  # pylint: disable=import-outside-toplevel
  trunk, text_width, text_heads, _ = WORKLOADS[workload]
  config = copy.deepcopy(open_clip.get_model_config('ViT-B-16-SigLIP'))
  config.pop('custom_text')
  config['text_cfg'].update(width=text_width, heads=text_heads)
  model = open_clip.CustomTextCLIP(**config)
  if workload != 'w1':  # W1's trunk is already vit_base_patch16_siglip_224.
    model.visual.trunk = timm.create_model(
        trunk, class_token=False, global_pool='map', num_classes=config['embed_dim'])
  return model


def setup(workload: str, warmup: int):
  """(step, info) for interleave.serve: one SigLIP + Adam step of `workload`."""
  import torch  # pylint: disable=import-outside-toplevel
  open_clip = import_open_clip()
  torch.manual_seed(0)
  model = build_model(open_clip, workload)
  model.train()
  batch = WORKLOADS[workload][3]
  images = torch.rand(batch, 3, 224, 224) * 2 - 1
  tokens = torch.randint(1, model.vocab_size, (batch, model.context_length))
  loss_fn = open_clip.loss.SigLipLoss()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
  losses = []

  def step():
    image_features, text_features, scale, bias = model(images, tokens)
    loss = loss_fn(image_features, text_features, scale, bias)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(float(loss.detach()))

  for _ in range(warmup):
    step()
  info = {'framework': 'open_clip', 'open_clip': open_clip.__version__,
          'torch': torch.__version__, 'threads': torch.get_num_threads(),
          'params': sum(p.numel() for p in model.parameters()),
          'warmup_losses': losses[:]}
  return step, info


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workload', choices=sorted(WORKLOADS))
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args()
  interleave.serve(lambda: setup(args.workload, args.warmup))


if __name__ == '__main__':
  main()
