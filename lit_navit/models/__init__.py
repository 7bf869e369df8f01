"""Models: the packed NaViT image tower, the text tower and the two-tower wrapper.

  two_towers  TwoTowers(config), default_config(), param_shapes, param_count
  navit       NaViT image tower (patch embedding with FlexiViT PI-resize)
  text        TextTransformer
  encoder     transformer blocks shared by both towers
  attention   the attention seam (dense / xla / cudnn) and segment masks
  pooling     MAP head and masked mean per slot
  posemb      position embeddings of packed patches
  flexi       PI-resize of the patch-embedding kernel
  variants    named sizes ('B/16', ...)
  flops       analytic FLOPs for MFU
"""
