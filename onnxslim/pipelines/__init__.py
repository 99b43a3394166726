"""Pipeline presets, one TOML file each: a description and a pipeline text."""
