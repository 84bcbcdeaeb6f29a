"""Networks (nothing is re-exported here: import from the defining modules).

The SSD detector (``ssd``), its heads (``heads``) and backbones (``backbones/``), the book's
TinySSD (``tiny_ssd``), weight converters (``convert``) and the Lightning module
(``ssd_module``).
"""
