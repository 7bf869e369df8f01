"""Image-text retrieval recall@K, in the standard (Karpathy split) protocol.

text -> image: a caption is a hit at K if its own image is among the K images
  most similar to it.
image -> text: an image is a hit at K if any of its captions is among the K
  captions most similar to it.

Ties are broken by index, lower first, as a stable sort would: a candidate
outranks the true match if it scores higher, or scores the same and comes
earlier. So results never depend on the order a sort happens to return.
"""

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _ranks(scores, target):
  """Rank (0 = best) of column target[i] in each row of scores, ties by index."""
  rows = np.arange(scores.shape[0])
  target_score = scores[rows, target][:, None]
  columns = np.arange(scores.shape[1])[None, :]
  better = (scores > target_score) | ((scores == target_score) &
                                      (columns < target[:, None]))
  return better.sum(axis=1)


def text_to_image_ranks(image_emb, text_emb, text_to_image, chunk=1024):
  """For each caption, the rank of its own image among all images."""
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_to_image = np.asarray(text_to_image, np.int64)
  ranks = np.empty(len(text_emb), np.int64)
  for start in range(0, len(text_emb), chunk):
    stop = start + chunk
    scores = text_emb[start:stop] @ image_emb.T
    ranks[start:stop] = _ranks(scores, text_to_image[start:stop])
  return ranks


def image_to_text_ranks(image_emb, text_emb, text_to_image, chunk=256):
  """For each image, the best rank any of its captions reaches among all captions."""
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_to_image = np.asarray(text_to_image, np.int64)
  ranks = np.empty(len(image_emb), np.int64)
  for start in range(0, len(image_emb), chunk):
    images = np.arange(start, min(start + chunk, len(image_emb)))
    scores = image_emb[images] @ text_emb.T
    own = text_to_image[None, :] == images[:, None]
    # With ties by index, an image's best-ranked caption is its highest-scoring
    # caption, the earliest one among equals; its rank is that caption's rank.
    best = np.argmax(np.where(own, scores, -np.inf), axis=1)
    ranks[images] = _ranks(scores, best)
  return ranks


def recall_at_k(image_emb, text_emb, text_to_image, ks=DEFAULT_KS):
  """Recall@K both ways.

  Args:
    image_emb: [Ni, D] image embeddings (L2-normalised for cosine similarity).
    text_emb: [Nt, D] caption embeddings.
    text_to_image: [Nt] ints, the index of each caption's image.
    ks: the K values to report.

  Returns:
    {'text_to_image/R@K': float, 'image_to_text/R@K': float, ...} for each K,
    fractions in [0, 1].

  Raises:
    ValueError: when a caption points outside the images or an image has no
      caption (the image -> text recall would be undefined for it).
  """
  text_to_image = np.asarray(text_to_image, np.int64)
  num_images, num_texts = len(image_emb), len(text_emb)
  if text_to_image.shape != (num_texts,):
    raise ValueError(f'text_to_image has shape {text_to_image.shape}, '
                     f'expected ({num_texts},)')
  if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f'text_to_image must index the {num_images} images')
  captionless = np.setdiff1d(np.arange(num_images), text_to_image)
  if captionless.size:
    raise ValueError(f'{captionless.size} images have no caption, '
                     f'e.g. image {captionless[0]}')
  t2i = text_to_image_ranks(image_emb, text_emb, text_to_image)
  i2t = image_to_text_ranks(image_emb, text_emb, text_to_image)
  metrics = {}
  for k in ks:
    metrics[f'text_to_image/R@{k}'] = float(np.mean(t2i < k))
    metrics[f'image_to_text/R@{k}'] = float(np.mean(i2t < k))
  return metrics
