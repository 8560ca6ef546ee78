#include "attention/attention_plugin.h"

#include <cmath>

namespace trtglm
{

AttentionPlugin::AttentionPlugin(FieldReader const& f, bool& ok) noexcept
{
    f.get("scale", mScale);
    f.get("causal", mCausal);
    ok = mScale >= 0.f && (mCausal == 0 || mCausal == 1);
    if (!ok)
    {
        logError("TrtglmAttention: scale must be >= 0 (0: 1/sqrt(head_dim)), causal 0 or 1");
    }
}

void AttentionPlugin::fieldNames(std::vector<char const*>& names)
{
    names = {"scale", "causal"};
}

void AttentionPlugin::fields(FieldWriter& w) const
{
    w.add("scale", &mScale);
    w.add("causal", &mCausal);
}

int32_t AttentionPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != 3 || nbOutputs != 1)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t AttentionPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const*, int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept
{
    if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 4 || inputs[1].nbDims != 4 || inputs[2].nbDims != 4)
    {
        return -1;
    }
    outputs[0] = inputs[0]; // [batch, q_heads, q_len, head_dim]
    return 0;
}

bool AttentionPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept
{
    nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return d.type == nvinfer1::DataType::kHALF || d.type == nvinfer1::DataType::kBF16;
    }
    return d.type == inOut[0].desc.type;
}

AttentionParams AttentionPlugin::params(nvinfer1::Dims const& q, nvinfer1::Dims const& k) const noexcept
{
    AttentionParams p;
    p.batch = static_cast<int32_t>(q.d[0]);
    p.q_heads = static_cast<int32_t>(q.d[1]);
    p.q_len = static_cast<int32_t>(q.d[2]);
    p.head_dim = static_cast<int32_t>(q.d[3]);
    p.kv_heads = static_cast<int32_t>(k.d[1]);
    p.kv_len = static_cast<int32_t>(k.d[2]);
    p.scale = mScale > 0.f ? mScale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
    p.causal = mCausal == 1;
    return p;
}

size_t AttentionPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    if (nbInputs != 3)
    {
        return 0;
    }
    AttentionParams p = params(inputs[0].max, inputs[1].max); // the largest shapes of the profile
    p.q_len = 1; // decode is the only case that needs the workspace
    return attentionWorkspaceSize(p);
}

int32_t AttentionPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    AttentionParams p = params(inputDesc[0].dims, inputDesc[1].dims);
    p.q = inputs[0];
    p.k = inputs[1];
    p.v = inputs[2];
    p.out = outputs[0];
    p.workspace = workspace;
    if (!toDType(inputDesc[0].type, p.dtype) || p.q_heads % p.kv_heads != 0 || p.kv_len < p.q_len)
    {
        logError("TrtglmAttention: q_heads must be a multiple of kv_heads and kv_len >= q_len");
        return -1;
    }
    return launchAttention(p, stream) == cudaSuccess ? 0 : -1;
}

} // namespace trtglm
