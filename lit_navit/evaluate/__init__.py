"""Evaluation of trained checkpoints (the library side of the eval/ scripts).

  embed              Embedder: images via the eval-mode pipeline, texts in chunks
  zero_shot          prompt-ensembled class embeddings, top-K accuracy,
                     the synthetic zero-shot and retrieval evals
  retrieval          recall@K both ways (Karpathy-split protocol)
  datasets           ImageNet / image-folder / TFRecord / TFDS readers,
                     COCO / Flickr / JSONL retrieval sets
  export             clip-retrieval / autofaiss embedding export and query
  imagenet_metadata  CLIP's class names, wnids and prompt templates
  referring          LocCa's referring-expression accuracy: greedy ARef
                     box decoding, IoU (the trainer's evals.box_accuracy)
  demo_eval          the synthetic metrics the trainer hook and demo report
  cli                flags and output shared by the eval/ scripts
"""
