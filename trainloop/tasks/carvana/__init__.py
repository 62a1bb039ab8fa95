"""The Kaggle Carvana Image Masking Challenge: everything ``recipes/unet_carvana.py`` uses.

One module per concern: the files on disk (``files``), the synthetic set (``synthetic``),
the input folder made ready (``prepare``), the split by car (``split``), the dataset and
its loaders (``dataset``), the U-Net (``unet``), its losses and the Dice metric
(``losses``), test-time flips (``tta``), Kaggle's run-length encoding (``rle``), the
submission writer (``submission``) and the pictures of masks (``pictures``).
"""
