// TrtglmAttention: softmax(scale * Q K^T [+ causal mask]) V with grouped-query attention; K and V are the whole
// cache (past and current tokens), so the same op serves prefill (q_len > 1) and decode (q_len == 1). README.md.
#pragma once

#include "common/plugin.h"

namespace trtglm
{

class AttentionPlugin : public PluginBase<AttentionPlugin>
{
public:
    static constexpr char const* kNAME = "TrtglmAttention";

    AttentionPlugin(FieldReader const& fields, bool& ok) noexcept;
    AttentionPlugin(AttentionPlugin const&) = default;
    static void fieldNames(std::vector<char const*>& names);
    void fields(FieldWriter& w) const;

    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

private:
    AttentionParams params(nvinfer1::Dims const& q, nvinfer1::Dims const& k) const noexcept;

    float mScale = 0.f;  // 0: 1 / sqrt(head_dim)
    int32_t mCausal = 1;
};

} // namespace trtglm
