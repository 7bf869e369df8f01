"""Models in and out of other frameworks' formats, one module per format.

  big_vision         .npz arrays <-> our params and config
  big_vision_import  CLI: a big_vision .npz -> a lit_navit workdir
  big_vision_export  CLI: a lit_navit checkpoint -> a big_vision .npz
  hf                 transformers SiglipModel / Siglip2Model <-> big_vision names
  hf_import          CLI: a transformers folder -> a lit_navit workdir
  hf_export          CLI: a lit_navit checkpoint -> a transformers folder
  workdir            the workdir an import writes (config, params, tokenizer)
  cli                what the CLIs share: one-line user errors, exit status 2
"""
