"""LocCa's box tasks as decoder token sequences: the shared token format.

Referring expressions (ARef: region text -> its box) and grounded captioning
(GCap: box -> its region text) are trained by the captioning decoder on
token sequences beside the captions. A box corner coordinate, normalised to
[0, 1] of the image as shown, is one location token of `bins` bins; the
location and task tokens sit after the text tower's vocabulary, so they
never reach the text tower and the decoder alone grows its vocabulary.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BoxFormat:
  """Token ids of the box tasks in the decoder's vocabulary."""
  vocab_offset: int  # The text vocabulary's size: the first location token.
  bins: int          # Location tokens, one per bin of a normalised coordinate.

  @property
  def aref_token(self) -> int:
    return self.vocab_offset + self.bins

  @property
  def gcap_token(self) -> int:
    return self.vocab_offset + self.bins + 1

  @property
  def vocab_size(self) -> int:
    """The decoder's vocabulary with the box tasks."""
    return self.vocab_offset + self.bins + 2


def format_from_config(config) -> BoxFormat:
  """The box format of a whole config: `model.text.vocab_size` and
  `model.decoder.box_bins`."""
  return BoxFormat(config.model.text.vocab_size, config.model.decoder.box_bins)
