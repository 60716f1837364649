from fastlm.models.bert import Bert  # noqa: F401
from fastlm.models.gpt2 import GPT2  # noqa: F401
