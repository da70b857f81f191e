"""Rewrite rules that passes apply (not passes themselves): canonicalize's rules for pointwise functions,
products, LayerNorm and channels-last chains; lower-integer's rules for tables, products and LayerNorm."""
