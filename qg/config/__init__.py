"""A run's settings: the profile schema and the profiles in params/.

Modules, each importing only those above it here (and packages listed before this one in qg):
  fields    the value types of its keys: counts, bit-widths, rates, dataset names, granularities
  blocks    the profile's sections, one pydantic model each: every key's type, range and meaning
  rpg       the rpg section (10_rpg), built from the generator and training blocks
  schema    the whole profile: its sections together, validated, and the README's reference
  profiles  a run's settings (params/<name>.yaml), validated, and where its files live
"""
