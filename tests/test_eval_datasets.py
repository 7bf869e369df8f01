"""Evaluation dataset readers on fixtures written to tmp_path."""

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from lit_navit.evaluate import datasets
from lit_navit.evaluate import imagenet_metadata


def _png(colour=(200, 30, 30), size=(12, 8)) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, colour).save(buffer, format='PNG')
  return buffer.getvalue()


def _write(path, data: bytes = None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(_png() if data is None else data)
  return str(path)


def test_image_folder_with_custom_classnames(tmp_path):
  root = tmp_path / 'pets'
  _write(root / 'dog' / 'b.jpg')
  _write(root / 'dog' / 'sub' / 'a.png')
  _write(root / 'cat' / 'x.JPEG')
  (root / 'cat' / 'notes.txt').write_text('not an image')
  names = tmp_path / 'names.txt'
  names.write_text('a cat\n\na dog\n')
  data = datasets.image_folder(str(root), str(names))
  assert data.classnames == ['a cat', 'a dog']
  assert list(data.labels) == [0, 1, 1]
  keys = [os.path.relpath(data.source[i].key, root) for i in range(3)]
  assert keys == ['cat/x.JPEG', 'dog/b.jpg', 'dog/sub/a.png']
  assert data.source[0].image.startswith(b'\x89PNG')


def test_image_folder_classnames_json_mapping_and_defaults(tmp_path):
  root = tmp_path / 'd'
  _write(root / 'golden_retriever' / '1.png')
  _write(root / 'tabby' / '1.png')
  mapping = tmp_path / 'names.json'
  mapping.write_text(json.dumps({'tabby': 'tabby cat', 'golden_retriever': 'dog'}))
  assert datasets.image_folder(str(root), str(mapping)).classnames == ['dog', 'tabby cat']
  assert datasets.image_folder(str(root)).classnames == ['golden retriever', 'tabby']
  wrong = tmp_path / 'three.txt'
  wrong.write_text('a\nb\nc\n')
  with pytest.raises(ValueError, match='3 class names for 2 classes'):
    datasets.image_folder(str(root), str(wrong))


def test_imagenet_folder_uses_wnid_order(tmp_path):
  root = tmp_path / 'imagenet'
  # Only two classes present; ids still follow the 1000 sorted wnids.
  _write(root / 'val' / 'n15075141' / 'ILSVRC2012_val_00000001.JPEG')
  _write(root / 'val' / 'n01440764' / 'ILSVRC2012_val_00000002.JPEG')
  data = datasets.imagenet_folder(str(root))
  assert list(data.labels) == [0, 999]
  assert data.classnames[0] == 'tench' and len(data.classnames) == 1000
  _write(root / 'val' / 'not_a_wnid' / 'x.JPEG')
  with pytest.raises(ValueError, match='not_a_wnid'):
    datasets.imagenet_folder(str(root))


def test_missing_paths_are_named(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    datasets.image_folder(missing)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    datasets.karpathy_json(missing + '.json', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='image folder not found: .*nowhere'):
    datasets.jsonl_retrieval(_write(tmp_path / 'a.jsonl', b''), missing)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    datasets.read_templates(missing)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    datasets.read_classnames(missing)


def test_missing_image_file_reads_as_bad_record(tmp_path):
  files = datasets.ImageFiles([str(tmp_path / 'gone.jpg')], ['a caption'])
  record = files[0]
  assert record.image == b'' and 'unreadable' in record.error
  assert record.caption == 'a caption'


def test_karpathy_json_coco_and_flickr(tmp_path):
  coco = {'images': [
      {'filepath': 'val2014', 'filename': 'a.jpg', 'split': 'test',
       'sentences': [{'raw': 'A cat. ', 'tokens': ['a', 'cat']},
                     {'raw': 'A kitten.'}]},
      {'filepath': 'val2014', 'filename': 'b.jpg', 'split': 'train',
       'sentences': [{'raw': 'Ignored.'}]},
      {'filepath': 'val2014', 'filename': 'c.jpg', 'split': 'test',
       'sentences': [{'tokens': ['a', 'dog']}]},
  ]}
  path = tmp_path / 'dataset_coco.json'
  path.write_text(json.dumps(coco))
  data = datasets.karpathy_json(str(path), str(tmp_path))
  assert data.captions == ['A cat.', 'A kitten.', 'a dog']
  assert list(data.text_to_image) == [0, 0, 1]
  assert data.source.paths == [str(tmp_path / 'val2014' / 'a.jpg'),
                               str(tmp_path / 'val2014' / 'c.jpg')]
  # Flickr30k's Karpathy file has no filepath.
  flickr = {'images': [{'filename': '1.jpg', 'split': 'test',
                        'sentences': [{'raw': 'x'}]}]}
  path = tmp_path / 'dataset_flickr30k.json'
  path.write_text(json.dumps(flickr))
  data = datasets.read_retrieval(str(path), str(tmp_path))
  assert data.source.paths == [str(tmp_path / '1.jpg')]
  with pytest.raises(ValueError, match="no images in split 'val'"):
    datasets.karpathy_json(str(path), str(tmp_path), split='val')


def test_flickr_token_file(tmp_path):
  token = tmp_path / 'results_20130124.token'
  token.write_text('1.jpg#0\tA man.\n1.jpg#1\tA person.\n'
                   '2.jpg#0\tA dog.\n\n3.jpg#0\tA tree.\n')
  data = datasets.read_retrieval(str(token), str(tmp_path))
  assert data.captions == ['A man.', 'A person.', 'A dog.', 'A tree.']
  assert list(data.text_to_image) == [0, 0, 1, 2]
  assert data.source[0].caption == 'A man.'
  test_list = tmp_path / 'test.txt'
  test_list.write_text('3.jpg\n1.jpg\n')
  data = datasets.flickr_token(str(token), str(tmp_path), str(test_list))
  assert [os.path.basename(p) for p in data.source.paths] == ['3.jpg', '1.jpg']
  assert list(data.text_to_image) == [0, 1, 1]
  token.write_text('1.jpg#0 no tab here\n')
  with pytest.raises(ValueError, match='line 1'):
    datasets.flickr_token(str(token), str(tmp_path))


def test_jsonl_retrieval(tmp_path):
  path = tmp_path / 'pairs.jsonl'
  path.write_text('{"image": "a.png", "captions": ["one", "two"]}\n'
                  '{"image": "b.png", "caption": "three"}\n')
  data = datasets.read_retrieval(str(path), None)
  assert data.captions == ['one', 'two', 'three']
  assert list(data.text_to_image) == [0, 0, 1]
  assert data.source.paths[1] == os.path.join(str(tmp_path), 'b.png')
  path.write_text('{"image": "a.png", "captions": []}\n')
  with pytest.raises(ValueError, match='no caption'):
    datasets.jsonl_retrieval(str(path))
  path.write_text('{"captions": ["x"]}\n')
  with pytest.raises(ValueError, match='line 1'):
    datasets.jsonl_retrieval(str(path))


def test_templates_file(tmp_path):
  path = tmp_path / 't.txt'
  path.write_text('a photo of a {}.\n\nart of the {}.\n')
  assert datasets.read_templates(str(path)) == ['a photo of a {}.', 'art of the {}.']
  path.write_text('no slot\n')
  with pytest.raises(ValueError, match='template 1'):
    datasets.read_templates(str(path))


def test_tfrecord_classification_int_and_wnid_labels(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def example(label_feature):
    return tf.train.Example(features=tf.train.Features(feature={
        'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png()])),
        'file_name': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'f.JPEG'])),
        'label': label_feature,
    })).SerializeToString()

  path = str(tmp_path / 'val.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(example(tf.train.Feature(int64_list=tf.train.Int64List(value=[7]))))
    writer.write(example(tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[b'n15075141']))))
  data = datasets.tfrecord_classification(path)
  assert list(data.labels) == [7, 999]
  assert data.source[1].image.startswith(b'\x89PNG')
  assert data.source[0].key.endswith('f.JPEG')
  with pytest.raises(ValueError, match='label_offset'):
    datasets.tfrecord_classification(path, label_offset=-8)


def test_tfds_missing_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match='tensorflow_datasets'):
    datasets.imagenet_tfds()


def test_metadata_sizes():
  assert len(imagenet_metadata.CLASSNAMES) == 1000
  assert len(imagenet_metadata.WNIDS) == 1000
  assert list(imagenet_metadata.WNIDS) == sorted(set(imagenet_metadata.WNIDS))
  assert len(imagenet_metadata.TEMPLATES) == 80
  assert len(set(imagenet_metadata.TEMPLATES)) == 80
  assert len(imagenet_metadata.TEMPLATES_7) == 7
  assert set(imagenet_metadata.TEMPLATES_7) <= set(imagenet_metadata.TEMPLATES)
  assert all(t.count('{}') == 1 for t in imagenet_metadata.TEMPLATES)
  # Spot checks against the synset list: class 0, the two cranes, the last.
  assert imagenet_metadata.WNIDS[0] == 'n01440764'
  assert imagenet_metadata.CLASSNAMES[134] == 'crane bird'
  assert imagenet_metadata.CLASSNAMES[517] == 'construction crane'
  assert imagenet_metadata.WNIDS[999] == 'n15075141'
  assert np.all([isinstance(c, str) and c for c in imagenet_metadata.CLASSNAMES])
