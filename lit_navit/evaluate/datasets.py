"""Evaluation datasets: classification and image-text retrieval sets.

Every reader returns a random-access image source (`sources.Source`: records
of encoded bytes, read lazily) with its labels or captions alongside, so the
eval pipeline packs images at their native aspect ratio exactly as it does
for training data. A missing file or folder is an error naming it; an image
file that is missing or broken is not: it reads as a bad record, which the
evaluation lists as failed.

Classification:
  image_folder        ROOT/<class>/**.jpg with optional class-name file
  imagenet_folder     ImageNet val as ROOT/<wnid>/*.JPEG
  imagenet_tfds       TFDS imagenet2012, if prepared
  tfrecord_classification  tf.train.Example files with an image and a label
Retrieval:
  karpathy_json       dataset_coco.json / dataset_flickr30k.json
  flickr_token        results_20130124.token ("img.jpg#k<TAB>caption")
  jsonl_retrieval     {"image": path, "captions": [...]} per line
  read_retrieval      any of the three, by file name
"""

import dataclasses
import json
import os

import numpy as np

from lit_navit import fs
from lit_navit.data import sources
from lit_navit.evaluate import imagenet_metadata

# Every format `decode.decode_image` reads.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.gif', '.bmp', '.tif',
                    '.tiff')


@dataclasses.dataclass
class ClassificationSet:
  """Images with class ids; labels[i] is the class of source[i]."""
  source: sources.Source
  labels: np.ndarray
  classnames: list


@dataclasses.dataclass
class RetrievalSet:
  """Images with one or more captions each.

  captions[j] describes image text_to_image[j]; every image has at least one.
  """
  source: sources.Source
  captions: list
  text_to_image: np.ndarray


class ImageFiles:
  """Image files by path, as a `sources.Source` (key = path).

  A file that cannot be read comes back as `image=b''` with `error` set.
  """

  def __init__(self, paths, captions=None):
    self.paths = [os.fspath(p) for p in paths]
    self.captions = list(captions) if captions is not None else None
    if self.captions is not None and len(self.captions) != len(self.paths):
      raise ValueError(f'{len(self.captions)} captions for {len(self.paths)} images')

  @property
  def image_paths(self) -> list:
    """The image file of each record (what an export keys records by)."""
    return self.paths

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    if not 0 <= index < len(self.paths):
      raise IndexError(f'index {index} out of range for {len(self.paths)} images')
    path = self.paths[index]
    caption = self.captions[index] if self.captions is not None else ''
    try:
      with fs.open(path, 'rb') as f:
        return sources.Record(index, f.read(), caption, path)
    except OSError as e:
      return sources.Record(index, b'', caption, path,
                            error=f'unreadable: {e.strerror or e}')


class Subset:
  """The records of `source` at `indices`, as a source of its own."""

  def __init__(self, source, indices):
    self.source = source
    self.indices = [int(i) for i in indices]

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.source[self.indices[index]]


def _require_file(path, what):
  if not fs.isfile(path):
    raise FileNotFoundError(f'{what} not found: {path}')


def _require_dir(path, what):
  if path is None:
    raise ValueError(f'{what} not given')
  if not fs.isdir(path):
    raise FileNotFoundError(f'{what} not found: {path}')


def _read_json(path):
  """A JSON file's value; ValueError naming the file, line and column."""
  with fs.open(path, 'r', encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} line {e.lineno} column {e.colno}: invalid JSON '
                       f'({e.msg})') from None
    except UnicodeDecodeError as e:
      raise ValueError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from None


def find_images(root):
  """Image files under `root`, recursively, in sorted path order."""
  _require_dir(root, 'image folder')
  return [path for path in fs.find(root)
          if fs.basename(path).lower().endswith(IMAGE_EXTENSIONS)]


def read_classnames(path, folders=None):
  """Class names from a file.

  Formats: .json, a list of names or a {folder: name} mapping; otherwise
  text, one name per line (blank lines ignored). A mapping needs `folders`
  (the class folder names, in class-id order) to order its names.
  """
  _require_file(path, 'class-name file')
  if path.endswith('.json'):
    names = _read_json(path)
    if isinstance(names, dict):
      if folders is None:
        raise ValueError(f'{path}: a folder -> name mapping needs class folders')
      missing = [d for d in folders if d not in names]
      if missing:
        raise ValueError(f'{path}: no name for class folder(s) {missing[:5]}')
      return [names[d] for d in folders]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise ValueError(f'{path}: expected a JSON list of strings or a mapping')
    return list(names)
  with fs.open(path, 'r', encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def read_templates(path):
  """Prompt templates, one a line, each with one '{}' for the class name."""
  _require_file(path, 'template file')
  with fs.open(path, 'r', encoding='utf-8') as f:
    templates = [line.strip() for line in f if line.strip()]
  for n, template in enumerate(templates, start=1):
    if template.count('{}') != 1:
      raise ValueError(f"{path}: template {n} {template!r} needs exactly one '{{}}'")
  if not templates:
    raise ValueError(f'{path}: no templates')
  return templates


def image_folder(root, classnames=None, class_folders=None):
  """A folder of class folders: ROOT/<class>/<any depth>/<image>.

  Args:
    root: the folder.
    classnames: a class-name file (see `read_classnames`), a list of names,
      or None for the folder names with '_' read as spaces.
    class_folders: the class folder names in class-id order (default: the
      sub-folders, sorted). Folders not listed are an error.

  Returns:
    A ClassificationSet; images are ordered by class, then path.
  """
  _require_dir(root, 'dataset folder')
  present = sorted(d for d in fs.listdir(root)
                   if fs.isdir(fs.join(root, d)))
  folders = list(class_folders) if class_folders is not None else present
  unknown = sorted(set(present) - set(folders))
  if unknown:
    raise ValueError(f'{root}: class folder(s) {unknown[:5]} are not among '
                     f'the {len(folders)} known classes')
  if classnames is None:
    names = [d.replace('_', ' ') for d in folders]
  elif isinstance(classnames, (str, os.PathLike)):
    names = read_classnames(os.fspath(classnames), folders)
  else:
    names = list(classnames)
  if len(names) != len(folders):
    raise ValueError(f'{len(names)} class names for {len(folders)} classes in {root}')
  class_id = {d: i for i, d in enumerate(folders)}
  paths, labels = [], []
  for folder in present:
    found = find_images(fs.join(root, folder))
    paths.extend(found)
    labels.extend([class_id[folder]] * len(found))
  if not paths:
    raise ValueError(f'{root}: no images ({", ".join(IMAGE_EXTENSIONS)}) found')
  return ClassificationSet(ImageFiles(paths), np.asarray(labels, np.int64), names)


def imagenet_folder(root, classnames=None):
  """ImageNet val in ImageFolder layout: ROOT/<wnid>/*.JPEG (ROOT may also be
  the folder holding `val/`). Class ids follow the sorted wnids; names are
  CLIP's unless `classnames` is given."""
  _require_dir(root, 'ImageNet folder')
  if fs.isdir(fs.join(root, 'val')):
    root = fs.join(root, 'val')
  return image_folder(root, classnames or list(imagenet_metadata.CLASSNAMES),
                      class_folders=imagenet_metadata.WNIDS)


def _read_tfrecord_labels(paths, label_key, label_offset, wnid_to_id):
  """One pass over TFRecord files reading each example's label feature."""
  # Imported here: tensorflow is slow to import and only this reader needs it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  labels = []
  for n, raw in enumerate(tf.data.TFRecordDataset(paths).as_numpy_iterator()):
    feature = example_pb2.Example.FromString(raw).features.feature.get(label_key)
    if feature is None:
      raise ValueError(f'record {n} of {paths[0]}...: no {label_key!r} feature')
    if feature.int64_list.value:
      labels.append(int(feature.int64_list.value[0]) + label_offset)
      continue
    value = feature.bytes_list.value[0].decode() if feature.bytes_list.value else ''
    if value in wnid_to_id:
      labels.append(wnid_to_id[value])
    elif value.strip().lstrip('-').isdigit():
      labels.append(int(value) + label_offset)
    else:
      raise ValueError(f'record {n}: label {value!r} is neither an integer nor a wnid')
  return np.asarray(labels, np.int64)


def tfrecord_classification(pattern, *, image_key='image', label_key='label',
                            key_key='file_name', label_offset=0,
                            classnames=imagenet_metadata.CLASSNAMES):
  """tf.train.Example files holding an encoded image and a class label.

  The label may be an int64 (plus `label_offset`: -1 for 1-based labels, as
  in the Inception ImageNet conversion) or bytes holding an integer or an
  ImageNet wnid.
  """
  source = sources.TFRecordSource(pattern, image_key=image_key, key_key=key_key)
  wnid_to_id = {w: i for i, w in enumerate(imagenet_metadata.WNIDS)}
  labels = _read_tfrecord_labels(source.paths, label_key, label_offset, wnid_to_id)
  if len(labels) != len(source):
    raise ValueError(f'{pattern}: {len(labels)} labels but {len(source)} '
                     f'readable records; the files are damaged ({source.skipped})')
  if len(labels) and (labels.min() < 0 or labels.max() >= len(classnames)):
    raise ValueError(f'{pattern}: labels span [{labels.min()}, {labels.max()}], '
                     f'outside the {len(classnames)} classes (label_offset?)')
  return ClassificationSet(source, labels, list(classnames))


def imagenet_tfds(split='validation', data_dir=None, classnames=None):
  """ImageNet from a prepared TFDS `imagenet2012` (its TFRecord files).

  Raises:
    ImportError: tensorflow_datasets is not installed.
    FileNotFoundError: the dataset was not prepared under `data_dir`.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'reading ImageNet from TFDS needs tensorflow_datasets (pip install '
        'tensorflow-datasets); or point --imagenet at a val/<wnid>/*.JPEG '
        'folder or at TFRecord files instead') from e
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'TFDS imagenet2012 is not prepared under {builder.data_dir}; run '
        'tfds.builder("imagenet2012").download_and_prepare() first')
  paths = [fs.join(builder.data_dir, name)
           for name in builder.info.splits[split].filenames]
  return tfrecord_classification(
      paths, image_key='image', label_key='label', key_key='file_name',
      classnames=classnames or imagenet_metadata.CLASSNAMES)


def _retrieval_set(paths, captions_per_image):
  captionless = [p for p, cs in zip(paths, captions_per_image) if not cs]
  if captionless:
    raise ValueError(f'{len(captionless)} images have no caption, e.g. '
                     f'{captionless[0]}')
  captions = [c for cs in captions_per_image for c in cs]
  text_to_image = np.repeat(np.arange(len(paths)),
                            [len(cs) for cs in captions_per_image])
  firsts = [cs[0] for cs in captions_per_image]
  return RetrievalSet(ImageFiles(paths, firsts), captions, text_to_image)


def karpathy_json(path, images_root, split='test'):
  """Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json, ...).

  Each entry of `images` has `filename`, optional `filepath` (COCO's
  train2014/ or val2014/ folder), `split` and `sentences[].raw`. Images are
  kept in file order; `split=None` keeps all.
  """
  _require_file(path, 'Karpathy split file')
  _require_dir(images_root, 'image folder (--images_root)')
  data = _read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise ValueError(f'{path}: no "images" list; not a Karpathy split file')
  paths, captions = [], []
  for n, entry in enumerate(data['images']):
    try:
      if split is not None and entry.get('split') != split:
        continue
      paths.append(fs.join(images_root, entry.get('filepath', ''),
                                entry['filename']))
      captions.append([s['raw'].strip() if 'raw' in s else ' '.join(s['tokens'])
                       for s in entry.get('sentences', [])])
    except (AttributeError, KeyError, TypeError) as e:
      raise ValueError(f'{path}: images[{n}] is malformed ({type(e).__name__}: '
                       f'{e}); expected filename and sentences[].raw') from None
  if not paths:
    raise ValueError(f'{path}: no images in split {split!r}')
  return _retrieval_set(paths, captions)


def flickr_token(path, images_root, image_list=None):
  """Flickr30k/8k token file: 'image.jpg#k<TAB>caption' per line.

  Args:
    path: the token file.
    images_root: the folder holding the images.
    image_list: optional file of image names, one a line (e.g. the 1k test
      split), restricting and ordering the images; default: all, in file order.
  """
  _require_file(path, 'caption token file')
  _require_dir(images_root, 'image folder (--images_root)')
  by_image = {}
  with fs.open(path, 'r', encoding='utf-8') as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      name_k, tab, caption = line.rstrip('\n').partition('\t')
      if not tab:
        raise ValueError(f'{path} line {n}: expected "image#k<TAB>caption"')
      by_image.setdefault(name_k.rsplit('#', 1)[0], []).append(caption.strip())
  names = list(by_image)
  if image_list is not None:
    _require_file(image_list, 'image list')
    with fs.open(image_list, 'r', encoding='utf-8') as f:
      names = [line.strip() for line in f if line.strip()]
    unknown = [name for name in names if name not in by_image]
    if unknown:
      raise ValueError(f'{image_list}: {len(unknown)} images have no caption '
                       f'in {path}, e.g. {unknown[0]}')
  return _retrieval_set([fs.join(images_root, n) for n in names],
                        [by_image[n] for n in names])


def jsonl_retrieval(path, images_root=None):
  """JSONL, one image a line: {"image": path, "captions": [...]} (or a single
  "caption"). Relative paths resolve against `images_root`, else the file's
  folder."""
  _require_file(path, 'JSONL file')
  root = images_root or fs.dirname(fs.absolute(path))
  _require_dir(root, 'image folder')
  paths, captions = [], []
  with fs.open(path, 'r', encoding='utf-8') as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        image = row['image']
        texts = row['captions'] if 'captions' in row else [row['caption']]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{path} line {n}: expected {{"image": ..., '
                         f'"captions": [...]}} ({e})') from None
      field = 'captions' if 'captions' in row else 'caption'
      if not isinstance(image, str) or not isinstance(texts, list) or not all(
          isinstance(t, str) for t in texts):
        raise ValueError(f'{path} line {n}: "image" must be a string and '
                         f'"{field}" a string (caption) or a list of strings '
                         f'(captions), got {row[field]!r:.80}')
      paths.append(fs.join(root, image))
      captions.append([t.strip() for t in texts])
  return _retrieval_set(paths, captions)


def read_retrieval(path, images_root, split='test', image_list=None):
  """A retrieval set in any supported format, chosen by the file name:
  .json -> Karpathy, .jsonl -> JSONL, anything else -> Flickr token file."""
  if path.endswith('.jsonl'):
    return jsonl_retrieval(path, images_root)
  if path.endswith('.json'):
    return karpathy_json(path, images_root, split)
  return flickr_token(path, images_root, image_list)
