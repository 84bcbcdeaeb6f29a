"""SSD backbones, one module each (nothing is re-exported here).

Each network returns a list of feature maps and exposes ``out_channels`` (and optionally
``head_init``); ``conf/backbone/<name>.yaml`` names it by ``_target_``. Import from the defining
module (``src.models.backbones.vgg16``, ...).
"""
