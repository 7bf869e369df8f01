"""Rules over parameter paths: lists of (regex, value) pairs, first match wins.

Which parameters are frozen, decayed, scaled or sharded how is configured as
such lists. A parameter's path joins its tree keys with '/', e.g.
'img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel', and a regex must
match the whole path.
"""

import re

import jax


def path_str(key_path) -> str:
  """'/'-joined keys of a `jax.tree_util` key path."""
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def tree_paths(tree) -> list[str]:
  """The '/'-joined path of every leaf, in `jax.tree.leaves` order."""
  return [path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree)]


def match_rules(tree, rules, what: str):
  """A tree like `tree` holding each leaf's first matching rule's value.

  Values must not be None (jax reads None as an empty subtree). Raises
  ValueError listing the paths that no rule matches; `what` names the rules
  (e.g. 'config.schedule') in that message.
  """
  compiled = [(re.compile(pattern), value) for pattern, value in rules]
  unmatched = []

  def value_of(key_path, _):
    path = path_str(key_path)
    for pattern, value in compiled:
      if pattern.fullmatch(path):
        return value
    unmatched.append(path)

  values = jax.tree_util.tree_map_with_path(value_of, tree)
  if unmatched:
    raise ValueError(f'No rule in {what} matches these parameters: '
                     + ', '.join(unmatched))
  return values
