"""The package's top level exports what a transformers user reaches for first."""

import transformers

import mmgen


def test_the_model_config_and_processor_are_importable_from_the_package():
    from mmgen import MMGenConfig, MMGenForConditionalGeneration, MMGenProcessor

    assert set(mmgen.__all__) >= {"MMGenConfig", "MMGenForConditionalGeneration", "MMGenProcessor"}
    assert MMGenForConditionalGeneration.config_class is MMGenConfig
    assert transformers.AutoConfig.for_model("mmgen").__class__ is MMGenConfig
    assert issubclass(MMGenProcessor, transformers.ProcessorMixin)
