from fastlm.models.bert import Bert  # noqa: F401
