"""Publishing a conversion: the Hub push (`hub`) and its generated model card (`card`)."""
