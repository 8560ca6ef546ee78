#include "rotary/rotary_plugin.h"

namespace trtglm
{

RotaryPlugin::RotaryPlugin(FieldReader const& f, bool& ok) noexcept
{
    f.get("rotary_dim", mRotaryDim);
    f.get("interleaved", mInterleaved);
    ok = mRotaryDim >= 0 && mRotaryDim % 2 == 0 && (mInterleaved == 0 || mInterleaved == 1);
    if (!ok)
    {
        logError("TrtglmRotary: rotary_dim must be even and >= 0 (0: the whole head), interleaved 0 or 1");
    }
}

void RotaryPlugin::fieldNames(std::vector<char const*>& names)
{
    names = {"rotary_dim", "interleaved"};
}

void RotaryPlugin::fields(FieldWriter& w) const
{
    w.add("rotary_dim", &mRotaryDim);
    w.add("interleaved", &mInterleaved);
}

int32_t RotaryPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != 4 || nbOutputs != 2 || !isFloat(inputTypes[0]))
    {
        return -1;
    }
    outputTypes[0] = outputTypes[1] = inputTypes[0];
    return 0;
}

int32_t RotaryPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*,
    int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept
{
    if (nbInputs != 4 || nbOutputs != 2 || inputs[0].nbDims != 4 || inputs[1].nbDims != 4)
    {
        return -1;
    }
    outputs[0] = inputs[0];
    outputs[1] = inputs[1];
    return 0;
}

bool RotaryPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept
{
    nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isFloat(d.type);                                     // q
    case 2:
    case 3: return d.type == nvinfer1::DataType::kFLOAT;                // cos, sin
    default: return d.type == inOut[0].desc.type;                       // k, q_out, k_out
    }
}

int32_t RotaryPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& q = inputDesc[0].dims;
    nvinfer1::Dims const& k = inputDesc[1].dims;
    RotaryParams p;
    p.q = inputs[0];
    p.k = inputs[1];
    p.cos = static_cast<float const*>(inputs[2]);
    p.sin = static_cast<float const*>(inputs[3]);
    p.q_out = outputs[0];
    p.k_out = outputs[1];
    p.batch = static_cast<int32_t>(q.d[0]);
    p.q_heads = static_cast<int32_t>(q.d[1]);
    p.kv_heads = static_cast<int32_t>(k.d[1]);
    p.seq = static_cast<int32_t>(q.d[2]);
    p.head_dim = static_cast<int32_t>(q.d[3]);
    p.rotary_dim = mRotaryDim > 0 ? mRotaryDim : p.head_dim;
    p.interleaved = mInterleaved == 1;
    if (!toDType(inputDesc[0].type, p.dtype) || p.rotary_dim > p.head_dim)
    {
        return -1;
    }
    return launchRotary(p, stream) == cudaSuccess ? 0 : -1;
}

} // namespace trtglm
