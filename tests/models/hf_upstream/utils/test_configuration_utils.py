"""`config_common_kwargs` for transformers' `ConfigTester.check_config_arguments_init`: attributes every
`PreTrainedConfig` takes, each set to a non-default value that the config must keep."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "chunk_size_feed_forward": 5,
    "architectures": ["HashMoEForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "bos_token_id": 3,
    "pad_token_id": 4,
    "eos_token_id": 5,
}
