"""The hospital side: what a site's IT team runs on its own machine; nothing here runs at the operator.

``cli`` (``rectalfl site check | preprocess | join``), ``join`` (flower-supernode and its checks),
``image_ops`` and ``preprocess`` (N4, normalisation, largest-tumour slice, the on-site cache),
``train`` and ``algorithm`` (local training of the response backbones), ``site_table`` (signatures,
clinical predictors and fusion scores, kept on site) and ``client_app`` (the Flower ClientApp that
answers the server's messages and writes the site's ``audit.jsonl``). Imports ``shared`` only.
"""
