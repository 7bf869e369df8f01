"""Trains a sentencepiece model on a text corpus (one caption per line).

  python tokenizers/train_sentencepiece.py --input corpus.txt --model_prefix out --vocab_size 8000
  python tokenizers/train_sentencepiece.py --synthetic 20000 --model_prefix tokenizers/synthetic --vocab_size 512

Ids follow big_vision's c4_en model: pad 0, eos 1, unk 2, no bos.
"""

import argparse
import os
import sys
import tempfile

import sentencepiece as spm


def synthetic_corpus(path: str, count: int) -> None:
  """Writes `count` captions of the synthetic source (all splits) to `path`."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from lit_navit.data import synthetic  # pylint: disable=g-import-not-at-top
  source = synthetic.SyntheticSource(size=count, seed=0, split='all', max_side=32)
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(count):
      f.write(source.attributes(i)['caption'] + '\n')
    for name in synthetic.class_names():
      f.write(f'a photo of a {name}.\n')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--input', help='text file, one sentence per line')
  parser.add_argument('--synthetic', type=int, default=0,
                      help='train on this many synthetic captions instead of --input')
  parser.add_argument('--model_prefix', required=True)
  parser.add_argument('--vocab_size', type=int, default=512)
  args = parser.parse_args(argv)
  if bool(args.input) == bool(args.synthetic):
    parser.error('give exactly one of --input and --synthetic')
  with tempfile.TemporaryDirectory() as tmp:
    corpus = args.input
    if args.synthetic:
      corpus = os.path.join(tmp, 'corpus.txt')
      synthetic_corpus(corpus, args.synthetic)
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=args.model_prefix, vocab_size=args.vocab_size,
        model_type='unigram', character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, num_threads=2, minloglevel=2)
  print(f'wrote {args.model_prefix}.model')


if __name__ == '__main__':
  main()
