"""The GPT–GLUE BiSSL recipe (thesis chapter 7): tasks, tokenizer, model, objectives, stages."""
