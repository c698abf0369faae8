"""The BiSSL vision recipe: SimCLR + ResNet (thesis chapter 6). Entry point:
``recipes/vision_bissl.py``.

Modules, one idea each:

- :mod:`~recipes.vision.config`: the recipe's typed configuration (YAML in ``recipes/configs``).
- :mod:`~recipes.vision.data`: the embedded digits split and the real datasets (STL10, ImageNet,
  VOC07, DTD, Pets, Flowers-102, ImageFolder), with errors that say how to obtain them.
- :mod:`~recipes.vision.augment`: the Sec. 6.1.1 augmentations, per image (``transforms.v2``) and
  per batch.
- :mod:`~recipes.vision.loaders`: DataLoaders for every stage.
- :mod:`~recipes.vision.models`: backbones, the SimCLR projector, pretext/downstream wrappers.
- :mod:`~recipes.vision.losses`: NT-Xent (eq. 2.1).
- :mod:`~recipes.vision.metrics`: top-k accuracy and the VOC07 11-point mAP.
- :mod:`~recipes.vision.train`: SimCLR pretraining, fine-tuning / linear probing, evaluation.
- :mod:`~recipes.vision.bissl_stage`: the BiSSL stage on ``implicitbilevel.bissl.BiSSLTrainer``.
"""
