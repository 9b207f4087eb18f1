"""The YAML configs `cart` ships with, installed as the package `cart_configs` (pyproject.toml)."""
