"""A run's settings: the profile schema and the profiles in params/.

Modules, each importing only those above it here (and packages listed before this one in qg):
  schema    the profile schema: every key's type, range and meaning (pydantic)
  profiles  a run's settings (params/<name>.yaml), validated, and where its files live
"""
