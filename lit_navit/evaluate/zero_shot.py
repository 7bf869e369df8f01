"""Zero-shot classification: prompt-ensembled class embeddings, top-K accuracy.

The ImageNet script, the in-training eval hook and the demo all go through
`evaluate_classification`; the synthetic helpers below only choose the data
(held-out shape-colour pairs) and the prompts.
"""

import numpy as np

from lit_navit.data import sources
from lit_navit.data import synthetic
from lit_navit.evaluate import retrieval

# Prompts for the synthetic shape-colour classes, e.g. 'a photo of a red circle'.
SYNTHETIC_TEMPLATES = ('a {}', 'a photo of a {}', 'there is a {}',
                       'a drawing of a {}')


def _normalise(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def class_embeddings(embed_texts, classnames, templates):
  """One embedding per class: each template encoded, normalised, averaged,
  and the mean renormalised (CLIP's prompt ensembling).

  Args:
    embed_texts: list[str] -> float [N, D], e.g. `Embedder.texts`.
    classnames: C class names.
    templates: T format strings with one '{}' for the class name.

  Returns:
    float32 [C, D], unit rows.
  """
  if not templates:
    raise ValueError('need at least one template')
  prompts = [t.format(c) for c in classnames for t in templates]
  emb = np.asarray(embed_texts(prompts), np.float32)
  emb = _normalise(emb.reshape(len(classnames), len(templates), -1))
  return _normalise(emb.mean(axis=1))


def classify(image_emb, class_emb, labels, ks=(1, 5)):
  """Top-K accuracy of nearest-class predictions.

  Ties between classes go to the lower class index, so results are
  deterministic.

  Args:
    image_emb: [N, D] image embeddings.
    class_emb: [C, D] class embeddings.
    labels: [N] true class ids.
    ks: the K values to report (those above C are capped at C).

  Returns:
    {'top1': ..., 'top5': ..., 'per_class': [C] top-1 accuracy per class
    (NaN for a class without images), 'mean_per_class': mean over classes
    with images, 'count_per_class': [C] images per class,
    'num_images': N, 'predictions': [N] top-1 class ids}.
  """
  labels = np.asarray(labels, np.int64)
  num_classes = len(class_emb)
  if len(image_emb) != len(labels):
    raise ValueError(f'{len(image_emb)} image embeddings but {len(labels)} labels')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes})')
  scores = np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T
  # A class outranks the true one if it scores higher, or equal with a lower id.
  true_score = scores[np.arange(len(labels)), labels][:, None]
  class_ids = np.arange(num_classes)[None, :]
  rank = ((scores > true_score) |
          ((scores == true_score) & (class_ids < labels[:, None]))).sum(axis=1)
  metrics = {f'top{k}': float(np.mean(rank < k)) if len(labels) else float('nan')
             for k in ks}
  count = np.bincount(labels, minlength=num_classes)
  hits = np.bincount(labels, weights=(rank == 0), minlength=num_classes)
  with np.errstate(invalid='ignore', divide='ignore'):
    per_class = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
  metrics['per_class'] = per_class
  metrics['mean_per_class'] = (float(np.nanmean(per_class)) if count.any()
                               else float('nan'))
  metrics['count_per_class'] = count
  metrics['num_images'] = int(len(labels))
  metrics['predictions'] = np.argmax(scores, axis=1)
  return metrics


def evaluate_classification(embedder, source, labels, classnames, templates,
                            *, progress=False, images=None, class_emb=None):
  """Zero-shot classification of every image of `source`.

  Args:
    embedder: an `embed.Embedder`.
    source: random-access images (`sources.Source`).
    labels: [len(source)] class ids.
    classnames: the class names, in class-id order.
    templates: prompt templates with one '{}'.
    progress: show a progress bar while embedding images.
    images: (image_emb, failed) from an earlier `embedder.images(source)`, to
      reuse; computed when None.
    class_emb: `class_embeddings(...)` of these classes and templates, to
      reuse across calls; computed when None.

  Returns:
    `classify`'s metrics over the images that decoded, plus 'chance'
    (1 / number of classes), 'num_failed' and 'failed' (index, key, reason)
    for the images that did not.
  """
  labels = np.asarray(labels, np.int64)
  if len(labels) != len(source):
    raise ValueError(f'{len(labels)} labels for {len(source)} images')
  image_emb, failed = images if images is not None else embedder.images(
      source, progress=progress)
  ok = np.ones(len(source), bool)
  ok[[index for index, _, _ in failed]] = False
  if class_emb is None:
    class_emb = class_embeddings(embedder.texts, classnames, templates)
  metrics = classify(image_emb[ok], class_emb, labels[ok])
  metrics['chance'] = 1.0 / len(classnames)
  metrics['num_failed'] = len(failed)
  metrics['failed'] = list(failed)
  return metrics


def synthetic_heldout_source(source_config, num_images: int):
  """The 'heldout' split of a synthetic training source: the shape-colour
  pairs no training caption names, drawn at the training image sizes."""
  config = source_config.copy_and_resolve_references()
  config.update(kind='synthetic', size=num_images, split='heldout')
  return sources.make_source(config)


def synthetic_zero_shot(embedder, source, templates=SYNTHETIC_TEMPLATES,
                        images=None):
  """Zero-shot over all shape x colour classes on synthetic images.

  Returns:
    {'top1', 'chance', 'per_class': {class name: top-1 accuracy} for the
    classes that have images, 'num_images', 'num_classes'}.
  """
  names = synthetic.class_names()
  labels = [source.attributes(i)['class_id'] for i in range(len(source))]
  metrics = evaluate_classification(embedder, source, labels, names, templates,
                                    images=images)
  return {
      'top1': metrics['top1'],
      'chance': metrics['chance'],
      'per_class': {name: float(acc) for name, acc, n in zip(
          names, metrics['per_class'], metrics['count_per_class']) if n},
      'num_images': metrics['num_images'],
      'num_classes': len(names),
  }


def synthetic_retrieval(embedder, source, images=None):
  """Image <-> text recall@1 between synthetic images and their own captions.

  Returns:
    {'image_to_text/R@1', 'text_to_image/R@1', 'num_images'}.
  """
  image_emb, failed = images if images is not None else embedder.images(source)
  ok = np.ones(len(source), bool)
  ok[[index for index, _, _ in failed]] = False
  kept = np.flatnonzero(ok)
  captions = [source.attributes(int(i))['caption'] for i in kept]
  text_emb = embedder.texts(captions)
  metrics = retrieval.recall_at_k(image_emb[kept], text_emb,
                                  np.arange(len(kept)), ks=(1,))
  metrics['num_images'] = int(len(kept))
  return metrics


def synthetic_eval(embedder, source, templates=SYNTHETIC_TEMPLATES):
  """`synthetic_zero_shot` and `synthetic_retrieval` on one image pass.

  This is what the in-training eval hook and the demo report.

  Returns:
    {'zero_shot/top1', 'zero_shot/chance', 'zero_shot/per_class',
    'retrieval/image_to_text/R@1', 'retrieval/text_to_image/R@1',
    'num_images'}.
  """
  images = embedder.images(source, progress=False)
  zero_shot = synthetic_zero_shot(embedder, source, templates, images=images)
  recall = synthetic_retrieval(embedder, source, images=images)
  return {
      'zero_shot/top1': zero_shot['top1'],
      'zero_shot/chance': zero_shot['chance'],
      'zero_shot/per_class': zero_shot['per_class'],
      'retrieval/image_to_text/R@1': recall['image_to_text/R@1'],
      'retrieval/text_to_image/R@1': recall['text_to_image/R@1'],
      'num_images': zero_shot['num_images'],
  }
