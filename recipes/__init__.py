"""BiSSL recipes: vision (SimCLR + ResNet) and NLP (GPT + GLUE) pipelines on implicitbilevel."""
