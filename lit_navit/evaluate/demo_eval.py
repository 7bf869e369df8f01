"""The demo's evaluation on the synthetic source, shared with the trainer hook.

`synthetic_metrics` is what the in-training eval hook reports and what the
demo reports from the final checkpoint: zero-shot classification over all
shape x colour classes on held-out pairs, and image <-> text recall@1.
`evaluate_and_export` adds an embedding export and a text query.
"""

from lit_navit import fs

from lit_navit.data import synthetic
from lit_navit.evaluate import embed
from lit_navit.evaluate import export
from lit_navit.evaluate import zero_shot


def synthetic_metrics(config, params, num_examples, batch_rows=8):
  """`zero_shot.synthetic_eval` of (config, params) on `num_examples`
  held-out synthetic images drawn like the training source's."""
  embedder = embed.Embedder.from_config(config, params, batch_rows)
  source = zero_shot.synthetic_heldout_source(config.input.source, num_examples)
  return zero_shot.synthetic_eval(embedder, source)


def evaluate_and_export(config, params, workdir, num_examples=512,
                        batch_rows=8):
  """Synthetic metrics, then an export of the held-out images' embeddings to
  WORKDIR/export and the top-5 images for a held-out class's prompt.

  Returns:
    {'zero_shot_top1', 'zero_shot_chance', 'image_to_text_r1',
    'text_to_image_r1', 'zero_shot_per_class', 'export_dir',
    'query': {'text', 'top_keys', 'top_classes'}}.
  """
  embedder = embed.Embedder.from_config(config, params, batch_rows)
  source = zero_shot.synthetic_heldout_source(config.input.source, num_examples)
  metrics = zero_shot.synthetic_eval(embedder, source)
  export_dir = fs.join(workdir, 'export')
  export.export(embedder, source, export_dir, part_size=max(1, num_examples // 4),
                texts=True, progress=False)
  class_name = synthetic.class_names()[synthetic.held_out_class_ids()[0]]
  article = 'an' if class_name[0] in 'aeiou' else 'a'
  query_text = f'a photo of {article} {class_name}'
  hits = export.query(export_dir, embedder.texts([query_text])[0], k=5)
  return {
      'zero_shot_top1': metrics['zero_shot/top1'],
      'zero_shot_chance': metrics['zero_shot/chance'],
      'zero_shot_per_class': metrics['zero_shot/per_class'],
      'image_to_text_r1': metrics['retrieval/image_to_text/R@1'],
      'text_to_image_r1': metrics['retrieval/text_to_image/R@1'],
      'export_dir': export_dir,
      'query': {
          'text': query_text,
          'top_keys': [hit['key'] for hit in hits],
          'top_classes': [synthetic.class_names()[
              source.attributes(hit['index'])['class_id']] for hit in hits],
      },
  }
